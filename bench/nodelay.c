/* Sets TCP_NODELAY on every socket a server accepts, for a server that does not (s3s-fs):
 * Nagle's algorithm on its responses meets the client's delayed ACK and costs 40 ms a
 * small request. Built and preloaded by `bench/cluster.py --s3-nodelay`. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
static void nd(int fd){ if(fd>=0){int one=1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);} }
int accept(int s, struct sockaddr *a, socklen_t *l){ static int (*f)(int,struct sockaddr*,socklen_t*); if(!f) f=dlsym(RTLD_NEXT,"accept"); int fd=f(s,a,l); nd(fd); return fd; }
int accept4(int s, struct sockaddr *a, socklen_t *l, int fl){ static int (*f)(int,struct sockaddr*,socklen_t*,int); if(!f) f=dlsym(RTLD_NEXT,"accept4"); int fd=f(s,a,l,fl); nd(fd); return fd; }
