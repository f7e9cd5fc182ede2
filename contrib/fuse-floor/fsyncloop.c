// fsyncloop.c: FILE SECS: a 24-byte header and a 4 KiB page at the next of 1,000 slots, then
// fdatasync, for SECS seconds; prints commits/s. See floor.c.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int argc,char**argv){
  int fd=open(argv[1],O_RDWR|O_CREAT,0644); if(fd<0){perror("open");return 1;}
  double secs=atof(argv[2]); char page[4096], hdr[24]; memset(page,7,sizeof page); memset(hdr,1,sizeof hdr);
  double t0=now(); long n=0;
  while(now()-t0<secs){ off_t off=(n%1000)*4120; page[n%4096]++;
    if(pwrite(fd,hdr,24,off)!=24||pwrite(fd,page,4096,off+24)!=4096){perror("pwrite");return 1;}
    if(fdatasync(fd)<0){perror("fdatasync");return 1;} n++; }
  double dt=now()-t0; printf("%s: %.0f commits/s (%.1f us)\n",argv[1],n/dt,dt/n*1e6); return 0; }
