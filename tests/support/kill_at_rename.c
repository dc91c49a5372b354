/* TEST-ONLY LD_PRELOAD shim for the C16 crash tests (tests/support/crash.py builds it).
 *
 * `openssl ca` commits an issuance by six rename() calls (serial, index.txt, index.txt.attr:
 * X -> X.old, X.new -> X). Preloaded into openssl, this shim SIGKILLs the whole process group
 * - openssl and the orchestrator that ran it, as a container stop or an OOM kill of the
 * cgroup does - just before or just after the n-th rename, as KILL_AT_RENAME="<n>:before" or
 * "<n>:after" in the environment says. Without that variable it only passes calls on.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int calls;

int rename(const char *from, const char *to) {
    static int (*real_rename)(const char *, const char *);
    if (!real_rename)
        real_rename = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    const char *spec = getenv("KILL_AT_RENAME");
    int n = spec ? atoi(spec) : 0;
    int after = spec && strstr(spec, ":after") != NULL;
    calls++;
    if (calls == n && !after)
        kill(0, SIGKILL);
    int result = real_rename(from, to);
    if (calls == n && after)
        kill(0, SIGKILL);
    return result;
}
