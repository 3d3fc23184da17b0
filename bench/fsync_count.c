/* Counts a process's fsync and fdatasync calls (LD_PRELOAD), for bench/forward.py.
 *
 * strace -f stalled syslog-ng 3.38 here (its http() destination stopped half-way, every
 * run), so both forwarders are counted this way instead. At exit the count is appended to
 * the file named by FSYNC_COUNT_FILE as "pid calls".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static long calls;

static int forward(const char *name, int fd) {
    __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED);
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, name);
    return real(fd);
}

int fsync(int fd) { return forward("fsync", fd); }
int fdatasync(int fd) { return forward("fdatasync", fd); }

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("FSYNC_COUNT_FILE");
    FILE *out = path ? fopen(path, "a") : NULL;
    if (out) {
        fprintf(out, "%d %ld\n", (int)getpid(), __atomic_load_n(&calls, __ATOMIC_RELAXED));
        fclose(out);
    }
}
