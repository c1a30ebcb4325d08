/*
 * The C side of bwrt's ABI, as a C program sees it: every error path returns
 * its documented status and a message, and one GEMM wave runs end to end
 * with a semaphore, a weight swap inside its window and counters.
 *
 * Built and run by tests/it/c_abi.rs; exits non-zero on the first failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bwrt.h"

static const BwrtApi *api;
static int checks;

#define FAIL(...)                                                      \
  do {                                                                 \
    fprintf(stderr, "test_bwrt.c:%d: ", __LINE__);                     \
    fprintf(stderr, __VA_ARGS__);                                      \
    fprintf(stderr, "\n");                                             \
    exit(1);                                                           \
  } while (0)

#define CHECK(cond)                                                    \
  do {                                                                 \
    checks++;                                                          \
    if (!(cond)) FAIL("check failed: %s", #cond);                      \
  } while (0)

/* `call` returns `want`, and the thread's last error has that status and a
 * message containing `needle`. */
#define EXPECT(call, want, needle)                                     \
  do {                                                                 \
    checks++;                                                          \
    BwrtStatus got_ = (call);                                          \
    if (got_ != (want)) {                                              \
      char msg_[512];                                                  \
      api->last_error(msg_, sizeof msg_);                              \
      FAIL("%s returned %d, want %d (%s)", #call, (int)got_, (int)(want), msg_); \
    }                                                                  \
    if ((want) != BWRT_STATUS_OK) expect_message((want), (needle), __LINE__); \
  } while (0)

static void expect_message(BwrtStatus want, const char *needle, int line) {
  char msg[512];
  BwrtStatus st = api->last_error(msg, sizeof msg);
  if (st != want) {
    fprintf(stderr, "test_bwrt.c:%d: last_error status %d, want %d\n", line, (int)st, (int)want);
    exit(1);
  }
  if (strlen(msg) == 0 || strstr(msg, needle) == NULL) {
    fprintf(stderr, "test_bwrt.c:%d: message \"%s\" lacks \"%s\"\n", line, msg, needle);
    exit(1);
  }
}

static BwrtTensor tensor2d(void *data, uint32_t dtype, const int64_t *shape) {
  BwrtTensor t;
  memset(&t, 0, sizeof t);
  t.struct_size = sizeof t;
  t.dtype = dtype;
  t.data = data;
  t.byte_offset = 0;
  t.ndim = 2;
  t.device.device_type = BWRT_DEVICE_CPU;
  t.device.device_id = 0;
  t.shape = shape;
  t.strides = NULL;
  return t;
}

static BwrtRuntimeConfig config(void) {
  BwrtRuntimeConfig c;
  memset(&c, 0, sizeof c);
  c.struct_size = sizeof c;
  c.workers = 2;
  c.ring_depth = 8;
  c.dtype = BWRT_DTYPE_F32;
  c.bm = 2;
  c.bn = 2;
  c.bk = 3;
  c.swap_begin = 1;
  c.swap_end = 2;
  return c;
}

int main(void) {
  /* Version negotiation. */
  CHECK(bwrt_get_api(999) == NULL);
  {
    char msg[256];
    CHECK(bwrt_last_error(msg, sizeof msg) == BWRT_STATUS_UNSUPPORTED_VERSION);
    CHECK(strstr(msg, "999") != NULL);
    /* Truncation keeps a NUL. */
    CHECK(bwrt_last_error(msg, 5) == BWRT_STATUS_UNSUPPORTED_VERSION);
    CHECK(strlen(msg) == 4);
    CHECK(bwrt_last_error(NULL, 0) == BWRT_STATUS_UNSUPPORTED_VERSION);
  }
  api = bwrt_get_api(BWRT_ABI_VERSION);
  CHECK(api != NULL);
  CHECK(api->abi_version == BWRT_ABI_VERSION);
  CHECK(api->struct_size >= sizeof(BwrtApi));

  /* Capabilities. */
  BwrtCaps caps;
  memset(&caps, 0, sizeof caps);
  EXPECT(api->get_caps(NULL), BWRT_STATUS_NULL_POINTER, "caps is NULL");
  caps.struct_size = 4;
  EXPECT(api->get_caps(&caps), BWRT_STATUS_BAD_STRUCT_SIZE, "struct_size");
  /* A caller built before `backends` and `cuda_devices` (32 bytes) gets
   * the fields it knows, and nothing past them is written. */
  memset(&caps, 0xAB, sizeof caps);
  caps.struct_size = 32;
  EXPECT(api->get_caps(&caps), BWRT_STATUS_OK, "");
  CHECK(caps.struct_size == 32);
  CHECK(caps.dtype_mask == 7);
  CHECK(caps.backends == 0xABABABABu);
  caps.struct_size = sizeof caps;
  EXPECT(api->get_caps(&caps), BWRT_STATUS_OK, "");
  CHECK(caps.struct_size == sizeof caps);
  CHECK(caps.backend == BWRT_BACKEND_CPU);
  CHECK(caps.dtype_mask == 7);
  CHECK(caps.features & BWRT_FEATURE_SWAP_QUEUE);
  CHECK(caps.backends & (1u << BWRT_BACKEND_CPU));
  if (!(caps.backends & (1u << BWRT_BACKEND_CUDA))) CHECK(caps.cuda_devices == 0);

  /* Runtime creation errors. */
  BwrtRuntime *rt = NULL;
  BwrtRuntimeConfig cfg = config();
  EXPECT(api->runtime_create(NULL, &rt), BWRT_STATUS_NULL_POINTER, "config is NULL");
  EXPECT(api->runtime_create(&cfg, NULL), BWRT_STATUS_NULL_POINTER, "out is NULL");
  cfg.struct_size = 47;
  EXPECT(api->runtime_create(&cfg, &rt), BWRT_STATUS_BAD_STRUCT_SIZE, "config->struct_size");
  /* A caller built before `backend` and `device` (48 bytes) gets the CPU
   * backend, whatever lies past its struct. */
  cfg = config();
  cfg.struct_size = 48;
  cfg.backend = 99;
  EXPECT(api->runtime_create(&cfg, &rt), BWRT_STATUS_OK, "");
  EXPECT(api->runtime_destroy(rt), BWRT_STATUS_OK, "");
  rt = NULL;
  cfg = config();
  cfg.backend = 99;
  EXPECT(api->runtime_create(&cfg, &rt), BWRT_STATUS_INVALID_ARGUMENT, "config.backend");
  /* The CUDA backend runs only in a build that has it, on a machine with a
   * device; anywhere else it is UNAVAILABLE, saying why. */
  cfg = config();
  cfg.backend = BWRT_BACKEND_CUDA;
  if ((caps.backends & (1u << BWRT_BACKEND_CUDA)) && caps.cuda_devices > 0) {
    EXPECT(api->runtime_create(&cfg, &rt), BWRT_STATUS_OK, "");
    EXPECT(api->runtime_destroy(rt), BWRT_STATUS_OK, "");
    rt = NULL;
  } else {
    EXPECT(api->runtime_create(&cfg, &rt), BWRT_STATUS_UNAVAILABLE, "CUDA");
  }
  cfg.device = 4096;
  EXPECT(api->runtime_create(&cfg, &rt), BWRT_STATUS_UNAVAILABLE, "CUDA");
  cfg = config();
  cfg.workers = 0;
  EXPECT(api->runtime_create(&cfg, &rt), BWRT_STATUS_INVALID_ARGUMENT, "config.workers");
  cfg = config();
  cfg.dtype = 42;
  EXPECT(api->runtime_create(&cfg, &rt), BWRT_STATUS_BAD_DTYPE, "config.dtype");
  cfg = config();
  cfg.bm = 0;
  EXPECT(api->runtime_create(&cfg, &rt), BWRT_STATUS_INVALID_ARGUMENT, "bm");
  cfg = config();
  cfg.swap_begin = 5;
  EXPECT(api->runtime_create(&cfg, &rt), BWRT_STATUS_INVALID_ARGUMENT, "swap_end");
  CHECK(rt == NULL);
  cfg = config();
  EXPECT(api->runtime_create(&cfg, &rt), BWRT_STATUS_OK, "");
  CHECK(rt != NULL);

  /* Semaphores. */
  BwrtSemaphore *sem = NULL;
  uint64_t value = 99;
  EXPECT(api->semaphore_create(0, NULL), BWRT_STATUS_NULL_POINTER, "out is NULL");
  EXPECT(api->semaphore_create(0, &sem), BWRT_STATUS_OK, "");
  EXPECT(api->semaphore_wait(NULL, 1, 0), BWRT_STATUS_NULL_POINTER, "sem is NULL");
  EXPECT(api->semaphore_wait(sem, 1, 0), BWRT_STATUS_TIMEOUT, "semaphore value 1");
  EXPECT(api->semaphore_wait(sem, 1, 1000000), BWRT_STATUS_TIMEOUT, "1000000 ns");
  EXPECT(api->semaphore_query(sem, NULL), BWRT_STATUS_NULL_POINTER, "value is NULL");
  EXPECT(api->semaphore_query(sem, &value), BWRT_STATUS_OK, "");
  CHECK(value == 0);
  BwrtSemaphore *other = NULL;
  EXPECT(api->semaphore_create(5, &other), BWRT_STATUS_OK, "");
  EXPECT(api->semaphore_signal(other, 3), BWRT_STATUS_INVALID_ARGUMENT, "may not decrease");
  EXPECT(api->semaphore_signal(other, 6), BWRT_STATUS_OK, "");
  EXPECT(api->semaphore_wait(other, 6, 0), BWRT_STATUS_OK, "");
  EXPECT(api->semaphore_destroy(other), BWRT_STATUS_OK, "");
  EXPECT(api->semaphore_destroy(NULL), BWRT_STATUS_OK, "");

  /* Wave submission errors. A is 3x4, B 4x5, C 3x5. */
  float a[12], b[20], c[15], w[20];
  for (int i = 0; i < 12; i++) a[i] = (float)(i % 5) - 2.0f;
  for (int i = 0; i < 20; i++) b[i] = (float)(i % 7) * 0.5f - 1.0f;
  for (int i = 0; i < 20; i++) w[i] = (float)(i % 3);
  const int64_t sa[2] = {3, 4}, sb[2] = {4, 5}, sc[2] = {3, 5}, sbad[2] = {3, 5};
  BwrtTensor ta = tensor2d(a, BWRT_DTYPE_F32, sa);
  BwrtTensor tb = tensor2d(b, BWRT_DTYPE_F32, sb);
  BwrtTensor tc = tensor2d(c, BWRT_DTYPE_F32, sc);
  BwrtWaveDesc desc;
  memset(&desc, 0, sizeof desc);
  desc.struct_size = sizeof desc;
  EXPECT(api->submit_wave(NULL, &desc, &ta, &tb, &tc, sem, 1), BWRT_STATUS_NULL_POINTER, "rt is NULL");
  EXPECT(api->submit_wave(rt, NULL, &ta, &tb, &tc, sem, 1), BWRT_STATUS_NULL_POINTER, "desc is NULL");
  EXPECT(api->submit_wave(rt, &desc, NULL, &tb, &tc, sem, 1), BWRT_STATUS_NULL_POINTER, "a is NULL");
  desc.struct_size = 2;
  EXPECT(api->submit_wave(rt, &desc, &ta, &tb, &tc, sem, 1), BWRT_STATUS_BAD_STRUCT_SIZE, "desc->struct_size");
  desc.struct_size = sizeof desc;
  desc.flags = 0x80;
  EXPECT(api->submit_wave(rt, &desc, &ta, &tb, &tc, sem, 1), BWRT_STATUS_INVALID_ARGUMENT, "desc.flags");
  desc.flags = 0;
  {
    BwrtTensor t = ta;
    t.struct_size = 8;
    EXPECT(api->submit_wave(rt, &desc, &t, &tb, &tc, sem, 1), BWRT_STATUS_BAD_STRUCT_SIZE, "a->struct_size");
    t = ta;
    t.dtype = 9;
    EXPECT(api->submit_wave(rt, &desc, &t, &tb, &tc, sem, 1), BWRT_STATUS_BAD_DTYPE, "a.dtype is 9");
    t = tb;
    t.dtype = BWRT_DTYPE_F16;
    EXPECT(api->submit_wave(rt, &desc, &ta, &t, &tc, sem, 1), BWRT_STATUS_BAD_DTYPE, "b.dtype");
    t = ta;
    t.ndim = 3;
    EXPECT(api->submit_wave(rt, &desc, &t, &tb, &tc, sem, 1), BWRT_STATUS_BAD_SHAPE, "a.ndim");
    t = ta;
    t.shape = NULL;
    EXPECT(api->submit_wave(rt, &desc, &t, &tb, &tc, sem, 1), BWRT_STATUS_NULL_POINTER, "a.shape");
    t = ta;
    t.data = NULL;
    EXPECT(api->submit_wave(rt, &desc, &t, &tb, &tc, sem, 1), BWRT_STATUS_NULL_POINTER, "a.data");
    t = ta;
    t.device.device_type = 2;
    EXPECT(api->submit_wave(rt, &desc, &t, &tb, &tc, sem, 1), BWRT_STATUS_INVALID_ARGUMENT, "a.device");
    t = ta;
    t.byte_offset = 2;
    EXPECT(api->submit_wave(rt, &desc, &t, &tb, &tc, sem, 1), BWRT_STATUS_BAD_SHAPE, "byte_offset");
    t = tb;
    t.shape = sbad;
    EXPECT(api->submit_wave(rt, &desc, &ta, &t, &tc, sem, 1), BWRT_STATUS_BAD_SHAPE, "b.shape[0]");
    /* C over A's memory. */
    t = tc;
    t.data = a;
    t.shape = sa;
    EXPECT(api->submit_wave(rt, &desc, &ta, &tb, &t, sem, 1), BWRT_STATUS_INVALID_ARGUMENT, "overlaps");
  }

  /* Swap window [1, 2): index 0 is before it. */
  BwrtTensor tw = tensor2d(w, BWRT_DTYPE_F32, sb);
  uint32_t outcome = 77;
  EXPECT(api->set_weights(NULL, 0, &tw, 0, &outcome), BWRT_STATUS_NULL_POINTER, "rt is NULL");
  EXPECT(api->set_weights(rt, 0, &tw, 0, &outcome), BWRT_STATUS_OUTSIDE_SWAP_WINDOW, "wave index 0");
  EXPECT(api->set_weights(rt, 0, &tw, BWRT_SWAP_QUEUE, &outcome), BWRT_STATUS_OK, "");
  CHECK(outcome == BWRT_SWAP_QUEUED);
  /* The copy is taken: scribbling on w now changes nothing. */
  float w_saved[20];
  memcpy(w_saved, w, sizeof w);
  memset(w, 0, sizeof w);

  /* One GEMM wave end to end. */
  memset(c, 0, sizeof c);
  EXPECT(api->submit_wave(rt, &desc, &ta, &tb, &tc, sem, 1), BWRT_STATUS_OK, "");
  EXPECT(api->semaphore_wait(sem, 1, UINT64_MAX), BWRT_STATUS_OK, "");
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 5; j++) {
      float want = 0.0f;
      for (int p = 0; p < 4; p++) want += a[i * 4 + p] * b[p * 5 + j];
      float got = c[i * 5 + j];
      if (got - want > 1e-5f || want - got > 1e-5f) FAIL("c[%d][%d] = %g, want %g", i, j, got, want);
    }
  checks++;

  /* Index 1: the queued swap was applied; a wave reads B from slot 0. */
  desc.flags = BWRT_WAVE_B_FROM_WEIGHTS | BWRT_WAVE_BLOCK_WHEN_FULL;
  desc.weight_slot = 0;
  memset(c, 0, sizeof c);
  EXPECT(api->submit_wave(rt, &desc, &ta, NULL, &tc, sem, 2), BWRT_STATUS_OK, "");
  EXPECT(api->semaphore_wait(sem, 2, UINT64_MAX), BWRT_STATUS_OK, "");
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 5; j++) {
      float want = 0.0f;
      for (int p = 0; p < 4; p++) want += a[i * 4 + p] * w_saved[p * 5 + j];
      if (c[i * 5 + j] != want) FAIL("weights wave c[%d][%d] = %g, want %g", i, j, c[i * 5 + j], want);
    }
  checks++;
  /* Index 2: the window has closed. */
  EXPECT(api->set_weights(rt, 0, &tw, BWRT_SWAP_QUEUE, NULL), BWRT_STATUS_OUTSIDE_SWAP_WINDOW, "closed");

  /* A wave on an empty slot fails its semaphore. */
  BwrtSemaphore *failing = NULL;
  EXPECT(api->semaphore_create(0, &failing), BWRT_STATUS_OK, "");
  desc.weight_slot = 7;
  EXPECT(api->submit_wave(rt, &desc, &ta, NULL, &tc, failing, 1), BWRT_STATUS_OK, "");
  EXPECT(api->semaphore_wait(failing, 1, UINT64_MAX), BWRT_STATUS_WAVE_FAILED, "slot 7");
  EXPECT(api->semaphore_destroy(failing), BWRT_STATUS_OK, "");

  /* Counters. */
  BwrtCounters ctr;
  memset(&ctr, 0, sizeof ctr);
  ctr.struct_size = 8;
  EXPECT(api->sample(rt, &ctr), BWRT_STATUS_BAD_STRUCT_SIZE, "counters->struct_size");
  EXPECT(api->sample(NULL, &ctr), BWRT_STATUS_NULL_POINTER, "rt is NULL");
  ctr.struct_size = sizeof ctr;
  EXPECT(api->sample(rt, &ctr), BWRT_STATUS_OK, "");
  CHECK(ctr.waves_submitted == 3);
  CHECK(ctr.waves_completed == 2);
  CHECK(ctr.waves_failed == 1);
  CHECK(ctr.flops == 2 * 2 * 3 * 5 * 4);
  CHECK(ctr.swap_window_violations == 2);
  CHECK(ctr.swaps_applied == 1);
  CHECK(ctr.swaps_pending == 0);
  CHECK(ctr.ring_depth == 8);

  /* Mbarriers. */
  BwrtMBarrier *mb = NULL;
  uint64_t phase = 99;
  EXPECT(api->mbarrier_create(0, &mb), BWRT_STATUS_INVALID_ARGUMENT, "expected");
  EXPECT(api->mbarrier_create(2, &mb), BWRT_STATUS_OK, "");
  EXPECT(api->mbarrier_arrive(NULL, 1, &phase), BWRT_STATUS_NULL_POINTER, "mb is NULL");
  EXPECT(api->mbarrier_arrive(mb, 1, &phase), BWRT_STATUS_OK, "");
  CHECK(phase == 0);
  EXPECT(api->mbarrier_wait(mb, 0, 0), BWRT_STATUS_TIMEOUT, "phase 0");
  EXPECT(api->mbarrier_arrive(mb, 2, &phase), BWRT_STATUS_INVALID_ARGUMENT, "count");
  EXPECT(api->mbarrier_arrive(mb, 1, NULL), BWRT_STATUS_OK, "");
  EXPECT(api->mbarrier_wait(mb, 0, 0), BWRT_STATUS_OK, "");
  EXPECT(api->mbarrier_destroy(mb), BWRT_STATUS_OK, "");

  EXPECT(api->semaphore_destroy(sem), BWRT_STATUS_OK, "");
  EXPECT(api->runtime_destroy(rt), BWRT_STATUS_OK, "");
  EXPECT(api->runtime_destroy(NULL), BWRT_STATUS_OK, "");
  printf("test_bwrt: %d checks passed\n", checks);
  return 0;
}
