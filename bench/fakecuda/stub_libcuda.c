/* A stand-in for libcuda.so.1, so that Triton's real C launcher runs on a machine without a GPU.

   Every CUDA driver call that Triton's NVIDIA backend makes (its driver.c) is answered here:
   devices are numbered 0..STUB_DEVICES-1, each with a primary context, and the current context
   follows cuCtxSetCurrent, so that Triton's get_current_device / set_current_device behave as on
   a machine with that many GPUs. Modules and functions get distinct handles. cuLaunchKernelEx
   launches nothing: it records the launch (function, grid, block, stream, the device current at
   the launch, and the bytes of every kernel parameter) in a ring of STUB_RECORDS entries, which
   bench/fakecuda/__init__.py reads through ctypes. The parameter sizes of the next launch come
   from stub_expect(), called by the Python side just before Triton's launcher runs (Triton's
   launcher passes an array of pointers and no count).

   Built by bench/fakecuda/__init__.py with Triton's own copy of cuda.h:
     cc -O2 -shared -fPIC -I<triton>/backends/nvidia/include stub_libcuda.c -o libcuda.so.1 */
#include <cuda.h>
#include <stdint.h>
#include <string.h>

#define STUB_DEVICES 2
#define STUB_RECORDS 4096
#define STUB_MAX_PARAMS 64
#define STUB_PARAM_BYTES 1024

typedef struct {
  uint64_t function;
  uint32_t grid[3];
  uint32_t block[3];
  uint64_t stream;
  int32_t device;        /* the device whose context was current at the launch */
  int32_t n_params;      /* -1: no stub_expect() before this launch, no bytes recorded */
  int32_t offsets[STUB_MAX_PARAMS];
  int32_t sizes[STUB_MAX_PARAMS];
  uint8_t bytes[STUB_PARAM_BYTES];
} stub_launch;

stub_launch stub_launches[STUB_RECORDS];
long long stub_n_launches = 0;

static int primary[STUB_DEVICES];     /* the primary contexts: their addresses are the handles */
static int current_device = 0;
static int modules = 0, functions = 0;
static int expect_n = -1;
static int32_t expect_sizes[STUB_MAX_PARAMS];

static int device_of(CUcontext ctx) {
  for (int d = 0; d < STUB_DEVICES; d++)
    if (ctx == (CUcontext)&primary[d]) return d;
  return -1;
}

/* The sizes of the parameters of the next launch (n of them; n > STUB_MAX_PARAMS records none). */
void stub_expect(int n, const int32_t *sizes) {
  expect_n = (n >= 0 && n <= STUB_MAX_PARAMS) ? n : -1;
  for (int i = 0; i < expect_n; i++) expect_sizes[i] = sizes[i];
}

void stub_reset(void) {
  stub_n_launches = 0;
  expect_n = -1;
  current_device = 0;
}

CUresult cuDriverGetVersion(int *v) { *v = 12080; return CUDA_SUCCESS; }
CUresult cuGetErrorString(CUresult e, const char **s) {
  *s = e == CUDA_SUCCESS ? "no error" : "stub libcuda: invalid value";
  return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
  if (ordinal < 0 || ordinal >= STUB_DEVICES) return CUDA_ERROR_INVALID_DEVICE;
  *d = ordinal;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int *v, CUdevice_attribute a, CUdevice d) {
  if (d < 0 || d >= STUB_DEVICES) return CUDA_ERROR_INVALID_DEVICE;
  switch (a) {  /* an H100 SXM's answers */
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = 132; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = 232448; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *v = 65536; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *v = 1980000; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *v = 2619000; break;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *v = 5120; break;
    default: *v = 1024;
  }
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice d) {
  if (d < 0 || d >= STUB_DEVICES) return CUDA_ERROR_INVALID_DEVICE;
  *ctx = (CUcontext)&primary[d];
  return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext *ctx) {
  *ctx = (CUcontext)&primary[current_device];
  return CUDA_SUCCESS;
}
CUresult cuCtxSetCurrent(CUcontext ctx) {
  int d = device_of(ctx);
  if (d < 0) return CUDA_ERROR_INVALID_CONTEXT;
  current_device = d;
  return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice *d) { *d = current_device; return CUDA_SUCCESS; }
CUresult cuCtxGetLimit(size_t *v, CUlimit l) { *v = 1 << 20; return CUDA_SUCCESS; }
CUresult cuCtxSetLimit(CUlimit l, size_t v) { return CUDA_SUCCESS; }
CUresult cuModuleLoadData(CUmodule *m, const void *image) {
  if (image == NULL) return CUDA_ERROR_INVALID_IMAGE;
  *m = (CUmodule)(uintptr_t)(0x10000 + ++modules);
  return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule m) { return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
  *f = (CUfunction)(uintptr_t)(0x20000 + ++functions);
  return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int *v, CUfunction_attribute a, CUfunction f) {
  switch (a) {
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
    case CU_FUNC_ATTRIBUTE_NUM_REGS: *v = 32; break;
    default: *v = 0;  /* CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES: no spills */
  }
  return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) { return CUDA_SUCCESS; }
CUresult cuFuncSetCacheConfig(CUfunction f, CUfunc_cache c) { return CUDA_SUCCESS; }
CUresult cuOccupancyMaxActiveClusters(int *n, CUfunction f, const CUlaunchConfig *c) {
  *n = 1;
  return CUDA_SUCCESS;
}
/* Every address is taken as a device address of itself (the tensors live in host memory). */
CUresult cuPointerGetAttribute(void *data, CUpointer_attribute a, CUdeviceptr p) {
  *(CUdeviceptr *)data = p;
  return CUDA_SUCCESS;
}
CUresult cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus *status) {
  *status = CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}
CUresult cuTensorMapEncodeTiled(CUtensorMap *t, CUtensorMapDataType d, cuuint32_t r, void *g,
                                const cuuint64_t *gd, const cuuint64_t *gs, const cuuint32_t *bd,
                                const cuuint32_t *es, CUtensorMapInterleave i,
                                CUtensorMapSwizzle sw, CUtensorMapL2promotion l2,
                                CUtensorMapFloatOOBfill f) {
  return CUDA_ERROR_NOT_SUPPORTED;  /* no kernel of this project uses TMA descriptors */
}

CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params,
                          void **extra) {
  stub_launch *r = &stub_launches[stub_n_launches % STUB_RECORDS];
  r->function = (uint64_t)(uintptr_t)f;
  r->grid[0] = config->gridDimX;
  r->grid[1] = config->gridDimY;
  r->grid[2] = config->gridDimZ;
  r->block[0] = config->blockDimX;
  r->block[1] = config->blockDimY;
  r->block[2] = config->blockDimZ;
  r->stream = (uint64_t)(uintptr_t)config->hStream;
  r->device = current_device;
  r->n_params = expect_n;
  int offset = 0;
  for (int i = 0; i < expect_n; i++) {
    int size = expect_sizes[i];
    if (size < 0 || offset + size > STUB_PARAM_BYTES) {
      r->n_params = -1;
      break;
    }
    r->offsets[i] = offset;
    r->sizes[i] = size;
    memcpy(r->bytes + offset, params[i], size);
    offset += size;
  }
  expect_n = -1;
  stub_n_launches++;
  return CUDA_SUCCESS;
}
