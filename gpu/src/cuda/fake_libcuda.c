// A fake CUDA driver (libcuda.so.1) for running dmaplane-gpu's CUDA tests without a GPU: the
// test `fake_driver_runs_every_gpu_test` in gpu/tests/cuda.rs builds it with the system C
// compiler and runs the test binary again against it. Not part of the crate's build.
//
// One device. "Device memory" is host memory, handed out 512 bytes past a 64 KiB boundary (as
// small cuMemAlloc suballocations can be). Every call checks its arguments and aborts on misuse:
// a call before cuInit, a copy outside every live allocation and registration, a double free, a
// registration overlapping another, unregistering what is not registered, a context used after
// its last release. At exit it prints what is still allocated and registered, and complains if
// the context was destroyed with allocations live (that frees memory importers may still use).
//
// Environment: FAKE_CUDA_NODEV (cuInit fails with CUDA_ERROR_NO_DEVICE), FAKE_CUDA_NO_DMABUF
// (CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED is 0), FAKE_CUDA_NO_PCIE (the PCIe mapping-type flag of
// cuMemGetHandleForAddressRange is refused with CUDA_ERROR_NOT_SUPPORTED).
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;

enum {
  OK = 0,
  INVALID_VALUE = 1,
  OUT_OF_MEMORY = 2,
  NO_DEVICE = 100,
  INVALID_DEVICE = 101,
  INVALID_CONTEXT = 201,
  ALREADY_REGISTERED = 712,
  NOT_SUPPORTED = 801,
};

#define SLOTS 4096
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int inited, retains;
static char the_context;
static __thread void *current;
static __thread void *pushed[16];
static __thread int depth;
static struct { uintptr_t ptr; size_t len; int live; } allocs[SLOTS];
static struct { uintptr_t ptr; size_t len; int live; } regs[SLOTS];
static size_t used;

static void die(const char *what) {
  fprintf(stderr, "FAKE CUDA MISUSE: %s\n", what);
  abort();
}

static CUresult need_ctx(void) {
  if (!inited) die("driver call before cuInit");
  return current == &the_context ? OK : INVALID_CONTEXT;
}

// Index of the live allocation holding [a, a + n), or -1. Call under mu.
static int find_alloc(uintptr_t a, size_t n) {
  for (int i = 0; i < SLOTS; i++)
    if (allocs[i].live && a >= allocs[i].ptr && a + n <= allocs[i].ptr + allocs[i].len) return i;
  return -1;
}

// Whether one live registration holds [a, a + n). Call under mu.
static int in_registration(uintptr_t a, size_t n) {
  for (int i = 0; i < SLOTS; i++)
    if (regs[i].live && a >= regs[i].ptr && a + n <= regs[i].ptr + regs[i].len) return 1;
  return 0;
}

__attribute__((destructor)) static void report(void) {
  int a = 0, r = 0;
  for (int i = 0; i < SLOTS; i++) a += allocs[i].live, r += regs[i].live;
  fprintf(stderr, "fake-cuda at exit: %d allocation(s) live, %d registration(s) live\n", a, r);
}

CUresult cuInit(unsigned flags) {
  if (flags) return INVALID_VALUE;
  inited = 1;
  return getenv("FAKE_CUDA_NODEV") ? NO_DEVICE : OK;
}

CUresult cuDriverGetVersion(int *v) {
  *v = 12080;
  return OK;
}

CUresult cuGetErrorName(CUresult e, const char **s) {
  switch (e) {
    case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case NO_DEVICE: *s = "CUDA_ERROR_NO_DEVICE"; break;
    case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
    case INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case ALREADY_REGISTERED: *s = "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"; break;
    case NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
    default: return INVALID_VALUE;  // as the driver does for a code it does not know
  }
  return OK;
}

CUresult cuGetErrorString(CUresult e, const char **s) {
  switch (e) {
    case INVALID_VALUE: *s = "invalid argument"; break;
    case OUT_OF_MEMORY: *s = "out of memory"; break;
    case NO_DEVICE: *s = "no CUDA-capable device is detected"; break;
    case ALREADY_REGISTERED: *s = "part or all of the requested memory range is already mapped"; break;
    case NOT_SUPPORTED: *s = "operation not supported"; break;
    default: *s = "fake error";
  }
  return OK;
}

CUresult cuDeviceGetCount(int *n) {
  if (!inited) die("cuDeviceGetCount before cuInit");
  *n = 1;
  return OK;
}

CUresult cuDeviceGet(CUdevice *d, int ordinal) {
  if (ordinal != 0) return INVALID_DEVICE;
  *d = 0;
  return OK;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
  if (d != 0) return INVALID_DEVICE;
  snprintf(name, len, "Fake H100");
  return OK;
}

CUresult cuDeviceGetPCIBusId(char *id, int len, CUdevice d) {
  if (d != 0) return INVALID_DEVICE;
  snprintf(id, len, "00000000:3B:00.0");
  return OK;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
  if (d != 0) return INVALID_DEVICE;
  *bytes = 80ull << 30;
  return OK;
}

CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
  if (d != 0) return INVALID_DEVICE;
  switch (attr) {
    case 75: *v = 9; break;  // compute capability major
    case 76: *v = 0; break;  // minor
    case 41: *v = 1; break;  // unified addressing
    case 124: *v = getenv("FAKE_CUDA_NO_DMABUF") ? 0 : 1; break;  // dma-buf supported
    default: *v = 0;
  }
  return OK;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) {
  if (d != 0) return INVALID_DEVICE;
  pthread_mutex_lock(&mu);
  retains++;
  pthread_mutex_unlock(&mu);
  *c = &the_context;
  return OK;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
  if (d != 0) return INVALID_DEVICE;
  pthread_mutex_lock(&mu);
  if (--retains < 0) die("primary context released more often than retained");
  if (retains == 0)
    for (int i = 0; i < SLOTS; i++)
      if (allocs[i].live) {
        fprintf(stderr, "FAKE CUDA: context destroyed with a live allocation of %zu bytes\n",
                allocs[i].len);
        allocs[i].live = 0;
      }
  pthread_mutex_unlock(&mu);
  return OK;
}

CUresult cuCtxSetCurrent(CUcontext c) {
  if (c != &the_context) die("cuCtxSetCurrent of a context this driver never made");
  if (retains <= 0) die("cuCtxSetCurrent of a released context");
  current = c;
  return OK;
}

// The backend pushes its context around every call and pops it after, so a thread's own
// context (the CUDA runtime's, say) is back in place when it returns.
CUresult cuCtxPushCurrent_v2(CUcontext c) {
  if (c != &the_context) die("cuCtxPushCurrent of a context this driver never made");
  if (retains <= 0) die("cuCtxPushCurrent of a released context");
  if (depth == 16) die("cuCtxPushCurrent 16 deep: a pop is missing");
  pushed[depth++] = current;
  current = c;
  return OK;
}

CUresult cuCtxPopCurrent_v2(CUcontext *c) {
  if (depth == 0) die("cuCtxPopCurrent without a push");
  if (c) *c = current;
  current = pushed[--depth];
  return OK;
}

// Only SYNC_MEMOPS (6) on a live allocation, with the value 1.
CUresult cuPointerSetAttribute(const void *value, int attr, CUdeviceptr p) {
  CUresult r = need_ctx();
  if (r) return r;
  if (attr != 6) die("cuPointerSetAttribute of an attribute other than SYNC_MEMOPS");
  if (*(const unsigned *)value != 1) die("SYNC_MEMOPS set to a value other than 1");
  pthread_mutex_lock(&mu);
  int i = find_alloc(p, 1);
  pthread_mutex_unlock(&mu);
  return i < 0 ? INVALID_VALUE : OK;
}

// MEMORY_TYPE (2): DEVICE (2) inside a live allocation; DEVICE_ORDINAL (9): 0 there.
CUresult cuPointerGetAttribute(void *data, int attr, CUdeviceptr p) {
  if (!inited) die("driver call before cuInit");
  if (attr != 2 && attr != 9) die("cuPointerGetAttribute of an attribute other than MEMORY_TYPE or DEVICE_ORDINAL");
  pthread_mutex_lock(&mu);
  int i = find_alloc(p, 1);
  pthread_mutex_unlock(&mu);
  if (i < 0) return INVALID_VALUE;
  if (attr == 2) *(unsigned *)data = 2;
  else *(int *)data = 0;
  return OK;
}

CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr p) {
  CUresult r = need_ctx();
  if (r) return r;
  pthread_mutex_lock(&mu);
  int i = find_alloc(p, 1);
  if (i >= 0) {
    *base = allocs[i].ptr;
    *size = allocs[i].len;
  }
  pthread_mutex_unlock(&mu);
  return i < 0 ? INVALID_VALUE : OK;
}

CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
  CUresult r = need_ctx();
  if (r) return r;
  if (n == 0) return INVALID_VALUE;
  if (n > (1ull << 40)) return OUT_OF_MEMORY;
  void *raw = NULL;
  if (posix_memalign(&raw, 65536, n + 65536)) return OUT_OF_MEMORY;
  memset(raw, 0xee, n + 65536);
  uintptr_t ptr = (uintptr_t)raw + 512;
  pthread_mutex_lock(&mu);
  for (int i = 0; i < SLOTS; i++)
    if (!allocs[i].live && !allocs[i].ptr) {
      allocs[i].ptr = ptr;
      allocs[i].len = n;
      allocs[i].live = 1;
      used += n;
      pthread_mutex_unlock(&mu);
      *p = ptr;
      return OK;
    }
  pthread_mutex_unlock(&mu);
  return OUT_OF_MEMORY;
}

CUresult cuMemFree_v2(CUdeviceptr p) {
  CUresult r = need_ctx();
  if (r) return r;
  pthread_mutex_lock(&mu);
  for (int i = 0; i < SLOTS; i++)
    if (allocs[i].live && allocs[i].ptr == p) {
      allocs[i].live = 0;  // the slot is not reused: a stale pointer stays detectable
      used -= allocs[i].len;
      memset((void *)allocs[i].ptr, 0xdd, allocs[i].len);
      pthread_mutex_unlock(&mu);
      return OK;
    }
  pthread_mutex_unlock(&mu);
  die("cuMemFree of a pointer that is not a live allocation (double free?)");
  return INVALID_VALUE;
}

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
  CUresult r = need_ctx();
  if (r) return r;
  *total = 80ull << 30;
  *free_bytes = *total - used;
  return OK;
}

static void check_side(uintptr_t a, size_t n, const char *side) {
  pthread_mutex_lock(&mu);
  int ok = find_alloc(a, n) >= 0 || in_registration(a, n);
  pthread_mutex_unlock(&mu);
  if (!ok) {
    fprintf(stderr, "cuMemcpy %s %#lx+%#zx\n", side, (unsigned long)a, n);
    die("cuMemcpy outside every live allocation and registration");
  }
}

CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  CUresult r = need_ctx();
  if (r) return r;
  check_side(src, n, "src");
  check_side(dst, n, "dst");
  memmove((void *)dst, (void *)src, n);
  return OK;
}

static void check_device(uintptr_t a, size_t n, const char *call) {
  pthread_mutex_lock(&mu);
  int i = find_alloc(a, n);
  pthread_mutex_unlock(&mu);
  if (i < 0) {
    fprintf(stderr, "%s %#lx+%#zx\n", call, (unsigned long)a, n);
    die("host copy outside every live allocation");
  }
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
  CUresult r = need_ctx();
  if (r) return r;
  check_device(dst, n, "cuMemcpyHtoD");
  memcpy((void *)dst, src, n);
  return OK;
}

CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
  CUresult r = need_ctx();
  if (r) return r;
  check_device(src, n, "cuMemcpyDtoH");
  memcpy(dst, (void *)src, n);
  return OK;
}

CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned flags) {
  CUresult r = need_ctx();
  if (r) return r;
  if (flags & 4) return INVALID_VALUE;  // IOMEMORY: ordinary memory is no I/O mapping
  if (flags != 3) die("cuMemHostRegister flags other than PORTABLE | DEVICEMAP");
  uintptr_t a = (uintptr_t)p;
  pthread_mutex_lock(&mu);
  for (int i = 0; i < SLOTS; i++)
    if (regs[i].live && a < regs[i].ptr + regs[i].len && regs[i].ptr < a + n) {
      pthread_mutex_unlock(&mu);
      return ALREADY_REGISTERED;
    }
  for (int i = 0; i < SLOTS; i++)
    if (!regs[i].live) {
      regs[i].ptr = a;
      regs[i].len = n;
      regs[i].live = 1;
      pthread_mutex_unlock(&mu);
      return OK;
    }
  pthread_mutex_unlock(&mu);
  return OUT_OF_MEMORY;
}

CUresult cuMemHostUnregister(void *p) {
  CUresult r = need_ctx();
  if (r) return r;
  pthread_mutex_lock(&mu);
  for (int i = 0; i < SLOTS; i++)
    if (regs[i].live && regs[i].ptr == (uintptr_t)p) {
      regs[i].live = 0;
      pthread_mutex_unlock(&mu);
      return OK;
    }
  pthread_mutex_unlock(&mu);
  die("cuMemHostUnregister of memory that is not registered");
  return INVALID_VALUE;
}

CUresult cuStreamSynchronize(void *stream) {
  if (stream) die("only the legacy default stream exists");
  return need_ctx();
}

CUresult cuMemGetHandleForAddressRange(void *handle, CUdeviceptr p, size_t n, int type,
                                       unsigned long long flags) {
  CUresult r = need_ctx();
  if (r) return r;
  if (type != 1) die("handle type other than CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD");
  if (flags == 1 && getenv("FAKE_CUDA_NO_PCIE")) return NOT_SUPPORTED;
  if (flags > 1) return INVALID_VALUE;
  if (p % 4096 || n % 4096) return INVALID_VALUE;  // host-page aligned, as the driver wants
  pthread_mutex_lock(&mu);
  int i = find_alloc(p, n);
  pthread_mutex_unlock(&mu);
  if (i < 0) return INVALID_VALUE;
  int fd = memfd_create("fake-dmabuf", MFD_CLOEXEC);
  if (fd < 0) return OUT_OF_MEMORY;
  *(int *)handle = fd;
  return OK;
}
