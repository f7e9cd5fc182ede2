// floor.c: the floor under synchronous=FULL for any FUSE filesystem on a machine, over both
// kernel transports. A server for one file `f` (kernel passthrough for its reads and writes,
// fdatasync for its fsync) that speaks the FUSE protocol directly, either over /dev/fuse reads
// and writes (`dev`) or over io_uring with one ring per CPU and each ring's thread pinned to
// its CPU (`uring`, Linux 6.14+; needs `echo Y > /sys/module/fuse/parameters/enable_uring`).
// `fsyncloop` times the commit-like loop of benches/floor.rs on any file.
//
// Not built by `make`: an experiment kept so that the README's figures can be reproduced.
//   apt-get install liburing-dev
//   gcc -O2 -o floor floor.c -luring -lpthread && gcc -O2 -o fsyncloop fsyncloop.c
//   mkdir -p back mnt native && ./floor uring $PWD/back $PWD/mnt &
//   ./fsyncloop native/f 3; ./fsyncloop mnt/f 3      (as root; alternate a few rounds)
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <unistd.h>

struct in_hdr { uint32_t len, opcode; uint64_t unique, nodeid; uint32_t uid, gid, pid; uint16_t total_extlen, padding; };
struct out_hdr { uint32_t len; int32_t error; uint64_t unique; };
struct init_in { uint32_t major, minor, max_readahead, flags, flags2, unused[11]; };
struct init_out { uint32_t major, minor, max_readahead, flags; uint16_t max_background, congestion_threshold;
  uint32_t max_write, time_gran; uint16_t max_pages, map_alignment; uint32_t flags2, max_stack_depth;
  uint16_t request_timeout, unused[11]; };
struct attr { uint64_t ino, size, blocks, atime, mtime, ctime; uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags; };
struct entry_out { uint64_t nodeid, generation, entry_valid, attr_valid; uint32_t entry_valid_nsec, attr_valid_nsec; struct attr attr; };
struct attr_out { uint64_t attr_valid; uint32_t attr_valid_nsec, dummy; struct attr attr; };
struct open_in { uint32_t flags, open_flags; };
struct open_out { uint64_t fh; uint32_t open_flags; int32_t backing_id; };
struct backing_map { int32_t fd; uint32_t flags; uint64_t padding; };
#define FUSE_DEV_IOC_BACKING_OPEN _IOW(229, 1, struct backing_map)

struct uring_ent_in_out { uint64_t flags, commit_id; uint32_t payload_sz, padding; uint64_t reserved; };
struct uring_req_header { char in_out[128]; char op_in[128]; struct uring_ent_in_out ent; };
struct uring_cmd_req { uint64_t flags, commit_id; uint16_t qid; uint8_t padding[6]; };

static int devfd, dirfd_, filefd, backing_id = -1, use_uring;
static const char *NAME = "f";

static void fill_attr(struct attr *a, struct stat *st, uint64_t ino) {
  memset(a, 0, sizeof *a);
  a->ino = ino; a->size = st->st_size; a->blocks = st->st_blocks; a->mode = st->st_mode; a->nlink = st->st_nlink;
  a->blksize = 4096; a->mtime = st->st_mtime; a->ctime = st->st_ctime; a->atime = st->st_atime;
}

// Handles one request; writes the out args to `out`, returns their size or -errno, or -9999 for no reply.
static int handle(struct in_hdr *h, void *opin, void *payload, char *out) {
  struct stat st;
  switch (h->opcode) {
  case 1: { // LOOKUP: name in payload (uring) or after header (dev)
    const char *name = payload;
    if (h->nodeid != 1 || strcmp(name, NAME)) return -ENOENT;
    fstatat(dirfd_, NAME, &st, 0);
    struct entry_out *e = (void *)out; memset(e, 0, sizeof *e);
    e->nodeid = 2; e->entry_valid = 3600; e->attr_valid = 3600; fill_attr(&e->attr, &st, 2);
    return sizeof *e;
  }
  case 2: return -9999; // FORGET
  case 3: { // GETATTR
    if (h->nodeid == 1) fstat(dirfd_, &st); else fstatat(dirfd_, NAME, &st, 0);
    struct attr_out *a = (void *)out; memset(a, 0, sizeof *a);
    a->attr_valid = 0; fill_attr(&a->attr, &st, h->nodeid);
    return sizeof *a;
  }
  case 14: { // OPEN
    struct open_out *o = (void *)out; memset(o, 0, sizeof *o);
    o->fh = 1; o->open_flags = 1u << 7; o->backing_id = backing_id; // FOPEN_PASSTHROUGH
    return sizeof *o;
  }
  case 18: return 0; // RELEASE
  case 20: { // FSYNC
    if (fdatasync(filefd) < 0) return -errno;
    return 0;
  }
  case 25: return 0; // FLUSH
  case 27: return 0; // OPENDIR
  case 29: return 0; // RELEASEDIR
  default: return -ENOSYS;
  }
}

static void *dev_loop(void *arg) {
  (void)arg;
  static __thread char buf[1 << 21];
  char out[4096];
  for (;;) {
    ssize_t n = read(devfd, buf, sizeof buf);
    if (n < 0) { if (errno == EINTR || errno == ENOENT) continue; if (errno == ENODEV) exit(0); perror("read"); exit(1); }
    struct in_hdr *h = (void *)buf;
    char *rest = buf + sizeof *h;
    int r;
    if (h->opcode == 26) { // INIT
      struct init_in *in = (void *)rest;
      struct init_out o; memset(&o, 0, sizeof o);
      o.major = 7; o.minor = in->minor < 44 ? in->minor : 44; o.max_readahead = in->max_readahead;
      o.flags = (1u << 30) /*INIT_EXT*/ | (1u << 22) /*MAX_PAGES*/;
      uint64_t want2 = (1ull << (37 - 32)) /*PASSTHROUGH*/;
      if (use_uring) want2 |= (1ull << (41 - 32));
      o.flags2 = (uint32_t)want2 & in->flags2;
      fprintf(stderr, "kernel 7.%u flags2 %#x, granted %#x\n", in->minor, in->flags2, o.flags2);
      o.max_background = 16; o.congestion_threshold = 12; o.max_write = 1 << 20; o.time_gran = 1; o.max_pages = 256;
      o.max_stack_depth = 1;
      memcpy(out, &o, sizeof o); r = sizeof o;
    } else {
      // LOOKUP name follows the header directly; for other ops the op struct does
      r = handle(h, rest, rest, out);
    }
    if (r == -9999) continue;
    struct out_hdr oh = { sizeof oh + (r > 0 ? r : 0), r < 0 ? r : 0, h->unique };
    char rep[8192]; memcpy(rep, &oh, sizeof oh); if (r > 0) memcpy(rep + sizeof oh, out, r);
    if (write(devfd, rep, oh.len) < 0 && errno != ENOENT) perror("write reply");
    if (h->opcode == 26 && backing_id < 0) {
      struct backing_map m = { filefd, 0, 0 };
      backing_id = ioctl(devfd, FUSE_DEV_IOC_BACKING_OPEN, &m);
      if (backing_id < 0) perror("BACKING_OPEN");
    }
  }
  return NULL;
}

#define ENTS 4
static void *ring_loop(void *arg) {
  int qid = (int)(long)arg;
  cpu_set_t set; CPU_ZERO(&set); CPU_SET(qid, &set); sched_setaffinity(0, sizeof set, &set);
  struct io_uring ring;
  struct io_uring_params p; memset(&p, 0, sizeof p);
  p.flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN;
  int e = io_uring_queue_init_params(ENTS * 2, &ring, &p);
  if (e < 0) { fprintf(stderr, "queue_init: %s\n", strerror(-e)); exit(1); }
  struct uring_req_header *hdr[ENTS]; char *pay[ENTS]; struct iovec iov[ENTS][2];
  for (int i = 0; i < ENTS; i++) {
    hdr[i] = aligned_alloc(4096, 4096); pay[i] = aligned_alloc(4096, 1 << 21);
    memset(hdr[i], 0, 4096);
    iov[i][0] = (struct iovec){ hdr[i], sizeof(struct uring_req_header) };
    iov[i][1] = (struct iovec){ pay[i], 1 << 21 };
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD; sqe->fd = devfd; sqe->cmd_op = 1; // REGISTER
    sqe->addr = (uint64_t)(uintptr_t)iov[i]; sqe->len = 2; sqe->user_data = i;
    struct uring_cmd_req *c = (void *)sqe->cmd; c->qid = qid;
  }
  io_uring_submit(&ring);
  char out[4096];
  for (;;) {
    struct io_uring_cqe *cqe;
    e = io_uring_wait_cqe(&ring, &cqe);
    if (e == -EINTR) continue;
    if (e < 0) { fprintf(stderr, "wait_cqe: %s\n", strerror(-e)); exit(1); }
    unsigned head, n = 0;
    io_uring_for_each_cqe(&ring, head, cqe) {
      int i = (int)cqe->user_data;
      n++;
      if (cqe->res < 0) { fprintf(stderr, "q%d ent %d: %s\n", qid, i, strerror(-cqe->res)); exit(1); }
      struct in_hdr *h = (void *)hdr[i]->in_out;
      int r = handle(h, hdr[i]->op_in, pay[i], out);
      struct out_hdr oh = { sizeof oh + (r > 0 ? r : 0), r < 0 ? r : 0, h->unique };
      uint64_t unique = h->unique;
      memcpy(hdr[i]->in_out, &oh, sizeof oh);
      if (r > 0) memcpy(pay[i], out, r);
      hdr[i]->ent.payload_sz = r > 0 ? r : 0;
      struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
      memset(sqe, 0, 128);
      sqe->opcode = IORING_OP_URING_CMD; sqe->fd = devfd; sqe->cmd_op = 2; // COMMIT_AND_FETCH
      sqe->user_data = i;
      struct uring_cmd_req *c = (void *)sqe->cmd; c->qid = qid; c->commit_id = unique;
    }
    io_uring_cq_advance(&ring, n);
    io_uring_submit(&ring);
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 4) { fprintf(stderr, "usage: floor dev|uring BACKING MNT\n"); return 2; }
  use_uring = !strcmp(argv[1], "uring");
  dirfd_ = open(argv[2], O_RDONLY | O_DIRECTORY);
  filefd = openat(dirfd_, NAME, O_RDWR | O_CREAT, 0644);
  devfd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
  char opts[256];
  snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", devfd);
  if (mount("floor", argv[3], "fuse.floor", MS_NOSUID | MS_NODEV, opts) < 0) { perror("mount"); return 1; }
  pthread_t t[8];
  int nth = use_uring ? 1 : 4;
  for (int i = 0; i < nth; i++) pthread_create(&t[i], NULL, dev_loop, NULL);
  if (use_uring) {
    while (backing_id < 0) usleep(1000); // INIT answered
    usleep(10000);
    int ncpu = get_nprocs_conf();
    for (int q = 0; q < ncpu; q++) pthread_create(&t[nth + q], NULL, ring_loop, (void *)(long)q);
  }
  pthread_join(t[0], NULL);
  return 0;
}
