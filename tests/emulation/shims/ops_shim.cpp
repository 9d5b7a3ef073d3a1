// C ABI over the CUDA launchers of every op (csrc/<op>/<op>.h, convention csrc/common/launch.h) for the emulation
// runner (ctypes; tests/emulation/emu_ops.py). dt / w_dt: attnfree::DType values (common/dtype.h); flags as int;
// the stream is the default one. *_ws return the launcher's workspace size.
#include <cstdint>

#include "aft_full/aft_full.h"
#include "aft_local/aft_local.h"
#include "aft_simple/aft_simple.h"
#include "ea_double_norm/ea_double_norm.h"

using attnfree::DType;
namespace ac = attnfree::cuda;

extern "C" {

uint64_t emu_aft_simple_fwd_ws(int64_t dt, int64_t B, int64_t T, int64_t D, int causal) {
  return ac::aft_simple_fwd_workspace_bytes(DType(dt), B, T, D, causal != 0);
}
uint64_t emu_aft_simple_bwd_ws(int64_t dt, int64_t B, int64_t T, int64_t D, int causal) {
  return ac::aft_simple_bwd_workspace_bytes(DType(dt), B, T, D, causal != 0);
}
int emu_aft_simple_fwd(int64_t dt, const void* q, const void* k, const void* v, void* y, void* lse, int64_t B,
                       int64_t T, int64_t D, int causal, void* ws, const int64_t* cu) {
  return ac::aft_simple_fwd(DType(dt), q, k, v, y, lse, B, T, D, causal != 0, ws, nullptr, cu);
}
int emu_aft_simple_bwd(int64_t dt, const void* dy, const void* q, const void* k, const void* v, const void* y,
                       const void* lse, void* dq, void* dk, void* dv, int64_t B, int64_t T, int64_t D, int causal,
                       void* ws, const int64_t* cu) {
  return ac::aft_simple_bwd(DType(dt), dy, q, k, v, y, lse, dq, dk, dv, B, T, D, causal != 0, ws, nullptr, cu);
}
uint64_t emu_aft_simple_state_fwd_ws(int64_t dt, int64_t B, int64_t T, int64_t D) {
  return ac::aft_simple_state_fwd_workspace_bytes(DType(dt), B, T, D);
}
uint64_t emu_aft_simple_state_bwd_ws(int64_t dt, int64_t B, int64_t T, int64_t D) {
  return ac::aft_simple_state_bwd_workspace_bytes(DType(dt), B, T, D);
}
int emu_aft_simple_state_fwd(int64_t dt, const void* q, const void* k, const void* v, const void* s0, void* y,
                             void* lse, void* sF, int64_t B, int64_t T, int64_t D, void* ws, const int64_t* cu) {
  return ac::aft_simple_state_fwd(DType(dt), q, k, v, s0, y, lse, sF, B, T, D, ws, nullptr, cu);
}
int emu_aft_simple_state_bwd(int64_t dt, const void* dy, const void* q, const void* k, const void* v, const void* y,
                             const void* lse, const void* final_query, const void* s0, void* dq, void* dk, void* dv,
                             void* key_sums, int64_t B, int64_t T, int64_t D, void* ws, const int64_t* cu) {
  return ac::aft_simple_state_bwd(DType(dt), dy, q, k, v, y, lse, final_query, s0, dq, dk, dv, key_sums, B, T, D, ws,
                                  nullptr, cu);
}

uint64_t emu_aft_local_fwd_ws(int64_t dt, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t window, int causal) {
  return ac::aft_local_fwd_workspace_bytes(DType(dt), B, T, D, heads, window, causal != 0);
}
uint64_t emu_aft_local_bwd_ws(int64_t dt, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t window, int causal) {
  return ac::aft_local_bwd_workspace_bytes(DType(dt), B, T, D, heads, window, causal != 0);
}
int emu_aft_local_fwd(int64_t dt, const void* q, const void* k, const void* v, const void* w, void* y, void* lse,
                      int64_t B, int64_t T, int64_t D, int64_t heads, int64_t window, int causal, int banded,
                      void* ws) {
  return ac::aft_local_fwd(DType(dt), q, k, v, w, y, lse, B, T, D, heads, window, causal != 0, banded != 0, ws,
                           nullptr);
}
int emu_aft_local_bwd(int64_t dt, const void* dy, const void* q, const void* k, const void* v, const void* w,
                      const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw, int64_t B, int64_t T,
                      int64_t D, int64_t heads, int64_t window, int causal, int banded, void* ws) {
  return ac::aft_local_bwd(DType(dt), dy, q, k, v, w, y, lse, dq, dk, dv, dw, B, T, D, heads, window, causal != 0,
                           banded != 0, ws, nullptr);
}

uint64_t emu_aft_full_fwd_ws(int64_t dt, int64_t B, int64_t T, int64_t D, int64_t heads, int causal, int exact) {
  return ac::aft_full_fwd_workspace_bytes(DType(dt), B, T, D, heads, causal != 0, exact != 0);
}
uint64_t emu_aft_full_bwd_ws(int64_t dt, int64_t B, int64_t T, int64_t D, int64_t heads, int causal, int exact) {
  return ac::aft_full_bwd_workspace_bytes(DType(dt), B, T, D, heads, causal != 0, exact != 0);
}
int emu_aft_full_fwd(int64_t dt, int64_t wdt, const void* q, const void* k, const void* v, const void* w, void* y,
                     void* lse, int64_t B, int64_t T, int64_t D, int64_t heads, int causal, int exact, int tf32x3,
                     void* ws) {
  return ac::aft_full_fwd(DType(dt), DType(wdt), q, k, v, w, y, lse, B, T, D, heads, causal != 0, exact != 0,
                          tf32x3 != 0, ws, nullptr);
}
int emu_aft_full_bwd(int64_t dt, int64_t wdt, const void* dy, const void* q, const void* k, const void* v,
                     const void* w, const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw, int64_t B,
                     int64_t T, int64_t D, int64_t heads, int causal, int exact, void* ws) {
  return ac::aft_full_bwd(DType(dt), DType(wdt), dy, q, k, v, w, y, lse, dq, dk, dv, dw, B, T, D, heads, causal != 0,
                          exact != 0, ws, nullptr);
}

uint64_t emu_aft_full_lowrank_fwd_ws(int64_t dt, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank,
                                     int causal, int exact) {
  return ac::aft_full_lowrank_fwd_workspace_bytes(DType(dt), B, T, D, heads, rank, causal != 0, exact != 0);
}
uint64_t emu_aft_full_lowrank_bwd_ws(int64_t dt, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank,
                                     int causal, int exact) {
  return ac::aft_full_lowrank_bwd_workspace_bytes(DType(dt), B, T, D, heads, rank, causal != 0, exact != 0);
}
int emu_aft_full_lowrank_fwd(int64_t dt, int64_t wdt, const void* q, const void* k, const void* v, const void* u,
                             const void* vb, void* y, void* lse, int64_t B, int64_t T, int64_t D, int64_t heads,
                             int64_t rank, int causal, int exact, int tf32x3, void* ws) {
  return ac::aft_full_lowrank_fwd(DType(dt), DType(wdt), q, k, v, u, vb, y, lse, B, T, D, heads, rank, causal != 0,
                                  exact != 0, tf32x3 != 0, ws, nullptr);
}
int emu_aft_full_lowrank_bwd(int64_t dt, int64_t wdt, const void* dy, const void* q, const void* k, const void* v,
                             const void* u, const void* vb, const void* y, const void* lse, void* dq, void* dk,
                             void* dv, void* du, void* dvb, int64_t B, int64_t T, int64_t D, int64_t heads,
                             int64_t rank, int causal, int exact, void* ws) {
  return ac::aft_full_lowrank_bwd(DType(dt), DType(wdt), dy, q, k, v, u, vb, y, lse, dq, dk, dv, du, dvb, B, T, D,
                                  heads, rank, causal != 0, exact != 0, ws, nullptr);
}

uint64_t emu_ea_double_norm_fwd_ws(int64_t dt, int64_t M, int64_t N, int64_t S) {
  return ac::ea_double_norm_fwd_workspace_bytes(DType(dt), M, N, S);
}
uint64_t emu_ea_double_norm_bwd_ws(int64_t dt, int64_t M, int64_t N, int64_t S) {
  return ac::ea_double_norm_bwd_workspace_bytes(DType(dt), M, N, S);
}
int emu_ea_double_norm_fwd(int64_t dt, const void* logits, void* out, void* lse, void* rowsum, int64_t M, int64_t N,
                           int64_t S, double eps, void* ws) {
  return ac::ea_double_norm_fwd(DType(dt), logits, out, lse, rowsum, M, N, S, eps, ws, nullptr);
}
int emu_ea_double_norm_bwd(int64_t dt, const void* dout, const void* logits, const void* out, const void* lse,
                           const void* rowsum, void* dlogits, int64_t M, int64_t N, int64_t S, void* ws) {
  return ac::ea_double_norm_bwd(DType(dt), dout, logits, out, lse, rowsum, dlogits, M, N, S, ws, nullptr);
}

}  // extern "C"
