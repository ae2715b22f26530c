/*
 * bench/pingpong.c: the latency floor that one call in flight meets on this
 * machine.  Two processes bounce one byte over a loopback TCP connection
 * (TCP_NODELAY), N times; one is pinned to CPU A, the other to CPU B.
 * Prints the median and 99th percentile round trip in microseconds.  A call
 * through a proxy on another CPU makes two such round trips (client ->
 * proxy -> backend -> proxy -> client), on top of all the work.
 *
 *   pingpong CPU_A CPU_B N
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void pin(int cpu) {
  cpu_set_t s;
  CPU_ZERO(&s);
  CPU_SET(cpu, &s);
  sched_setaffinity(0, sizeof(s), &s);
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  int a, b, n, i, lfd, fd, one = 1;
  struct sockaddr_in sa;
  socklen_t sl = sizeof(sa);
  double *rtt;
  char c = 'x';
  pid_t kid;
  if (argc != 4) return fprintf(stderr, "usage: pingpong CPU_A CPU_B N\n"), 2;
  a = atoi(argv[1]), b = atoi(argv[2]), n = atoi(argv[3]);
  rtt = calloc((size_t)n, sizeof(*rtt));
  lfd = socket(AF_INET, SOCK_STREAM, 0);
  memset(&sa, 0, sizeof(sa));
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 1) < 0) return perror("bind"), 1;
  getsockname(lfd, (struct sockaddr *)&sa, &sl);
  if ((kid = fork()) == 0) {
    pin(a);
    fd = accept(lfd, NULL, NULL);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    while (read(fd, &c, 1) == 1)
      if (write(fd, &c, 1) != 1) break;
    _exit(0);
  }
  pin(b);
  fd = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) return perror("connect"), 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  for (i = 0; i < n; i++) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (write(fd, &c, 1) != 1 || read(fd, &c, 1) != 1) return perror("io"), 1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    rtt[i] = (t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3;
  }
  close(fd);
  waitpid(kid, NULL, 0);
  qsort(rtt + n / 20, (size_t)(n - n / 20), sizeof(*rtt), cmp);
  {
    double *r = rtt + n / 20;
    int m = n - n / 20;
    printf("p10_us %.1f\np25_us %.1f\np50_us %.1f\np75_us %.1f\np99_us %.1f\n", r[m / 10], r[m / 4], r[m / 2],
           r[m * 3 / 4], r[(int)(m * 0.99)]);
  }
  return 0;
}
