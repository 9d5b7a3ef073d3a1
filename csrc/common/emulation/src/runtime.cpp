// attnfree_emu runtime: fibers and their scheduler, barriers and warp collectives, the buffer registry, faults,
// counters, the CUDA runtime API subset, the counted libm wrappers and the C API. See ../README.md.
//
// Compiled with the same flags as the kernels (it includes the emulated environment for the types), linked into
// every emulation library with -Wl,--wrap=<f> for each function in ../wrapped_functions.txt.
#include <attnfree_emu/cuda_emulation.h>
#include <attnfree_emu/capi.h>

#include <csetjmp>
#include <map>
#include <csignal>
#include <cstdarg>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// static shared memory section bounds (linker-defined; null when no kernel declares __shared__ variables)
extern "C" char __start_attnfree_emu_shared[] __attribute__((weak));
extern "C" char __stop_attnfree_emu_shared[] __attribute__((weak));

// ------------------------------------------------------------------------------------------------ built-ins
uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace attnfree_emu {

attnfree_emu_counters g_counters;
int g_in_kernel = 0;
int g_multi_cta_cluster = 0;

namespace {

// ------------------------------------------------------------------------------------------------ config
struct Config {
  uint64_t seed = 0x5eedull;
  int schedule = 0;  // 0 shuffle, 1 in order
  uint64_t grid_cap = 0;
  int poison = 1;
  int allow_unregistered = 0;
  size_t stack_bytes = 256 * 1024;
  size_t poison_stack_bytes = 0;
};
Config g_cfg;

uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return dflt;
  return std::strtoull(e, nullptr, 0);
}

__attribute__((constructor)) void read_env() {
  g_cfg.seed = env_u64("ATTNFREE_EMU_SEED", g_cfg.seed);
  const char* s = std::getenv("ATTNFREE_EMU_SCHEDULE");
  if (s != nullptr && (std::strcmp(s, "inorder") == 0 || std::strcmp(s, "1") == 0)) g_cfg.schedule = 1;
  g_cfg.grid_cap = env_u64("ATTNFREE_EMU_GRID_CAP", 0);
  g_cfg.poison = static_cast<int>(env_u64("ATTNFREE_EMU_POISON", 1));
  g_cfg.allow_unregistered = static_cast<int>(env_u64("ATTNFREE_EMU_ALLOW_UNREGISTERED", 0));
  const uint64_t kb = env_u64("ATTNFREE_EMU_STACK_KB", 256);
  g_cfg.stack_bytes = static_cast<size_t>(kb < 32 ? 32 : kb) * 1024;
  g_cfg.poison_stack_bytes = static_cast<size_t>(env_u64("ATTNFREE_EMU_POISON_STACK_KB", 0)) * 1024;
  if (g_cfg.poison_stack_bytes > g_cfg.stack_bytes / 2) g_cfg.poison_stack_bytes = g_cfg.stack_bytes / 2;
}

// ------------------------------------------------------------------------------------------------ rng
struct Rng {
  uint64_t s = 1;
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return n <= 1 ? 0 : next() % n; }
};
Rng g_rng;

// ------------------------------------------------------------------------------------------------ errors
int g_last_error = 0;    // cudaGetLastError (cleared when read)
int g_sticky_error = 0;  // a kernel fault: every later launch / API call fails until attnfree_emu_reset()
int g_fault_code = 0;
std::string g_fault_msg;

void set_error(int code, const std::string& msg) {
  if (g_last_error == 0) g_last_error = code;
  if (g_fault_code == 0) {
    g_fault_code = code;
    g_fault_msg = msg;
  }
}

// ------------------------------------------------------------------------------------------------ registry
struct BufEntry {
  Buffer b;
  std::string name;
  bool from_malloc;
};
std::vector<std::unique_ptr<BufEntry>> g_bufs;

const Buffer* lookup_impl(uintptr_t a) {
  const Buffer* best = nullptr;
  bool best_inside = false;
  for (const auto& e : g_bufs) {
    const Buffer& b = e->b;
    if (a < b.begin || a > b.end) continue;
    const bool inside = a < b.end;
    if (best == nullptr || (inside && !best_inside) ||
        (inside == best_inside && (b.end - b.begin) < (best->end - best->begin))) {
      best = &b;
      best_inside = inside;
    }
  }
  return best;
}

// ------------------------------------------------------------------------------------------------ fibers
#if defined(__x86_64__)
extern "C" void attnfree_emu_ctx_switch(void** save_sp, void* load_sp);
extern "C" void attnfree_emu_ctx_entry();
asm(R"(
  .text
  .p2align 4
  .globl attnfree_emu_ctx_switch
  .hidden attnfree_emu_ctx_switch
  .type attnfree_emu_ctx_switch,@function
attnfree_emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size attnfree_emu_ctx_switch, .-attnfree_emu_ctx_switch
  .p2align 4
  .globl attnfree_emu_ctx_entry
  .hidden attnfree_emu_ctx_entry
  .type attnfree_emu_ctx_entry,@function
attnfree_emu_ctx_entry:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size attnfree_emu_ctx_entry, .-attnfree_emu_ctx_entry
)");
#endif

enum FiberState { kRunnable = 0, kWaitBarrier = 1, kWaitWarp = 2, kExited = 3 };

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  char* map = nullptr;  // mapping: [guard page][stack]
  size_t map_bytes = 0;
  int state = kRunnable;
  int tid = 0;
  int warp = 0;
  int lane = 0;
  uint3 idx{};
  int bar_result = 0;
  int gid = 0;              // index in g_fibers: cta * threads per block + tid
  struct Block* blk = nullptr;  // its CTA
};

#if defined(__x86_64__)
void* g_sched_sp = nullptr;
#else
ucontext_t g_sched_uc;
#endif

std::vector<std::unique_ptr<Fiber>> g_fibers;
Fiber* g_cur = nullptr;
size_t g_page = 4096;

void fiber_main(void* arg);
#if !defined(__x86_64__)
void fiber_main_uc();
#endif

void ensure_fibers(int n) {
  while (static_cast<int>(g_fibers.size()) < n) {
    std::unique_ptr<Fiber> f(new Fiber());
    f->map_bytes = g_cfg.stack_bytes + g_page;
    void* m = mmap(nullptr, f->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "attnfree_emu: cannot map a %zu-byte thread stack\n", f->map_bytes);
      std::abort();
    }
    mprotect(m, g_page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting memory
    f->map = static_cast<char*>(m);
    g_fibers.push_back(std::move(f));
  }
}

void fiber_init(Fiber* f) {
  char* top = f->map + f->map_bytes;
  if (g_cfg.poison_stack_bytes) std::memset(top - g_cfg.poison_stack_bytes, 0xff, g_cfg.poison_stack_bytes);
#if defined(__x86_64__)
  uintptr_t S = (reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15)) - 16;
  uint64_t* w = reinterpret_cast<uint64_t*>(S - 64);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  uint64_t csr = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  w[0] = csr;                                                // [S-64] mxcsr, fpu cw
  w[1] = 0;                                                  // r15
  w[2] = 0;                                                  // r14
  w[3] = reinterpret_cast<uint64_t>(&fiber_main);            // r13: entry
  w[4] = reinterpret_cast<uint64_t>(f);                      // r12: argument
  w[5] = 0;                                                  // rbx
  w[6] = 0;                                                  // rbp
  w[7] = reinterpret_cast<uint64_t>(&attnfree_emu_ctx_entry);  // return address
  f->sp = w;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->map + g_page;
  f->uc.uc_stack.ss_size = f->map_bytes - g_page;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, reinterpret_cast<void (*)()>(&fiber_main_uc), 0);
#endif
}

inline void switch_to_fiber(Fiber* f) {
#if defined(__x86_64__)
  attnfree_emu_ctx_switch(&g_sched_sp, f->sp);
#else
  swapcontext(&g_sched_uc, &f->uc);
#endif
}
inline void switch_to_scheduler(Fiber* f) {
#if defined(__x86_64__)
  attnfree_emu_ctx_switch(&f->sp, g_sched_sp);
#else
  swapcontext(&f->uc, &g_sched_uc);
#endif
}

// ------------------------------------------------------------------------------------------------ block state
struct WarpGroup {
  unsigned mask = 0;
  unsigned arrived = 0;
  rt::CollectiveFn fn = nullptr;
  const char* what = "";
  const char* file = "";
  int line = 0;
  rt::LaneSlot* slots[32];
};

struct Warp {
  unsigned exists = 0;
  unsigned exited = 0;
  unsigned at_barrier = 0;
  std::vector<WarpGroup> groups;
};

// One CTA. A plain launch runs one at a time (g_blocks[0]); a cluster launch runs the CTAs of one cluster together
// (g_blocks[rank]), their threads fibers of one scheduler.
struct Block {
  int nthreads = 0;
  int live = 0;
  int exited = 0;
  std::vector<Warp> warps;
  // barrier
  int bar_waiting = 0;
  const char* bar_file = "";
  int bar_line = 0;
  int bar_kind = 0;
  long long bar_count = 0;
  int bar_and = 1;
  int bar_or = 0;
  std::vector<int> bar_waiters;  // fiber gids
  int cl_waiting = 0;            // threads of this CTA waiting at cluster_sync
  uint3 idx{};                   // blockIdx
  unsigned rank = 0;             // in its cluster
  char* dyn = nullptr;           // dynamic shared memory
};
const int kMaxClusterCtas = 8;  // the portable cluster size limit
Block g_blocks[kMaxClusterCtas];

// The cluster being run (a plain launch: a cluster of one CTA).
struct Cluster {
  int nctas = 1;
  unsigned dims[3] = {1, 1, 1};
  int live = 0;
  int exited = 0;
  int waiting = 0;  // threads at cluster_sync
  const char* file = "";
  int line = 0;
  std::vector<int> waiters;  // fiber gids
};
Cluster g_cluster;
std::vector<int> g_runnable;  // fiber gids, over every CTA of the cluster
bool g_failed = false;

// current launch (for messages)
const rt::LaunchConfig* g_launch = nullptr;
rt::KernelThunk g_thunk = nullptr;
void* g_thunk_ctx = nullptr;
unsigned g_grid_run[3] = {1, 1, 1};
sigjmp_buf g_jmp;

// static shared objects registered by the cu2cpp rewrite
std::vector<std::pair<void*, size_t>>* g_static_smem = nullptr;

// dynamic shared memory, per CTA of the cluster: [ ... smem ][guard page] [ ... smem ][guard page] ...
char* g_dyn_map = nullptr;
size_t g_dyn_map_bytes = 0;
size_t g_dyn_stride = 0;  // bytes from one CTA's region to the next
size_t g_dyn_bytes = 0;

long long g_clock = 0;
uint64_t g_launch_index = 0;
std::vector<attnfree_emu_launch_record> g_records;
std::map<const void*, int>* g_func_smem_attr = nullptr;

std::string where_prefix() {
  char buf[2048];
  if (g_launch == nullptr) return "attnfree_emu: ";
  char cl[96] = "";
  if (g_cluster.nctas > 1 || (g_launch->cluster[0] != 0))
    std::snprintf(cl, sizeof cl, " cluster (%u,%u,%u) rank %u", g_cluster.dims[0], g_cluster.dims[1],
                  g_cluster.dims[2], g_cur != nullptr ? g_cur->blk->rank : 0u);
  if (g_cur != nullptr)
    std::snprintf(buf, sizeof buf,
                  "attnfree_emu: kernel %s (launched at %s:%d in %s, grid (%u,%u,%u), block (%u,%u,%u)): "
                  "blockIdx (%u,%u,%u)%s threadIdx (%u,%u,%u): ",
                  g_launch->name, g_launch->file, g_launch->line, g_launch->caller ? g_launch->caller : "?", g_grid_run[0], g_grid_run[1], g_grid_run[2],
                  g_launch->block[0], g_launch->block[1], g_launch->block[2], blockIdx.x, blockIdx.y, blockIdx.z, cl,
                  g_cur->idx.x, g_cur->idx.y, g_cur->idx.z);
  else
    std::snprintf(buf, sizeof buf,
                  "attnfree_emu: kernel %s (launched at %s:%d in %s, grid (%u,%u,%u), block (%u,%u,%u)): "
                  "blockIdx (%u,%u,%u)%s: ",
                  g_launch->name, g_launch->file, g_launch->line, g_launch->caller ? g_launch->caller : "?", g_grid_run[0], g_grid_run[1], g_grid_run[2],
                  g_launch->block[0], g_launch->block[1], g_launch->block[2], blockIdx.x, blockIdx.y, blockIdx.z, cl);
  return buf;
}

void record_fault(int code, const char* detail) {
  const std::string msg = where_prefix() + detail;
  set_error(code, msg);
  if (g_sticky_error == 0) g_sticky_error = code;
  g_failed = true;
}

std::string vformat(const char* fmt, va_list ap) {
  char buf[2048];
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || std::strcmp(f1, f2) == 0);
}

Fiber* current_or_die(const char* what) {
  if (g_cur == nullptr) {
    std::fprintf(stderr, "attnfree_emu: %s called outside a kernel\n", what);
    std::abort();
  }
  return g_cur;
}

void yield_current() {
  Fiber* f = g_cur;
  g_runnable.push_back(f->gid);
  switch_to_scheduler(f);
}

void thread_exit(Fiber* f) {
  Block& B = *f->blk;
  Warp& W = B.warps[f->warp];
  const unsigned bit = 1u << f->lane;
  for (const WarpGroup& g : W.groups)
    if (g.mask & bit)
      rt::fault(719, "thread exited while lanes 0x%08x of its warp wait for it in %s (%s:%d, mask 0x%08x)",
                g.arrived, g.what, g.file, g.line, g.mask);
  if (B.bar_waiting > 0)
    rt::fault(719,
              "thread exited while %d thread(s) of the block wait at __syncthreads (%s:%d): a barrier must be "
              "reached by every thread of the block",
              B.bar_waiting, B.bar_file, B.bar_line);
  Cluster& C = g_cluster;
  if (C.waiting > 0)
    rt::fault(719,
              "thread exited while %d thread(s) of the cluster wait at cluster_sync (%s:%d): a cluster barrier must "
              "be reached by every thread of every CTA of the cluster",
              C.waiting, C.file, C.line);
  f->state = kExited;
  W.exited |= bit;
  B.live--;
  B.exited++;
  C.live--;
  C.exited++;
  // Its shared memory is gone on the GPU once a CTA has exited: reads through cluster_map_shared show NaN.
  if (B.live == 0 && C.live > 0 && g_cfg.poison && g_dyn_bytes) std::memset(B.dyn, 0xff, g_dyn_bytes);
}

void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  g_thunk(g_thunk_ctx);
  thread_exit(f);
  switch_to_scheduler(f);
  __builtin_unreachable();
}

#if !defined(__x86_64__)
void fiber_main_uc() { fiber_main(g_cur); }
#endif

// Called in the scheduler when no thread can run but some are alive.
void report_deadlock() {
  const Cluster& C = g_cluster;
  std::string d = format("deadlock: %d of %d thread(s) alive, none can run;", C.live,
                         g_blocks[0].nthreads * C.nctas);
  if (C.waiting) d += format(" %d wait at cluster_sync (%s:%d);", C.waiting, C.file, C.line);
  for (int c = 0; c < C.nctas; ++c) {
    const Block& B = g_blocks[c];
    const std::string cta = C.nctas > 1 ? format(" CTA rank %d:", c) : std::string();
    if (B.bar_waiting)
      d += cta + format(" %d wait at __syncthreads (%s:%d);", B.bar_waiting, B.bar_file, B.bar_line);
    for (size_t w = 0; w < B.warps.size(); ++w)
      for (const WarpGroup& g : B.warps[w].groups)
        d += cta + format(" warp %zu: lanes 0x%08x wait in %s (%s:%d) for mask 0x%08x;", w, g.arrived, g.what, g.file,
                          g.line, g.mask);
  }
  record_fault(719, d.c_str());
}

// ------------------------------------------------------------------------------------------------ signals
struct sigaction g_old_act[65];
stack_t g_old_ss;
char* g_alt_stack = nullptr;
const size_t kAltStack = 256 * 1024;
char g_sig_msg[512];

void on_signal(int sig, siginfo_t* si, void*) {
  if (g_cur != nullptr && g_in_kernel) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(si->si_addr);
    const uintptr_t guard = reinterpret_cast<uintptr_t>(g_cur->map);
    // the guard page after the dynamic shared memory of any CTA of the cluster
    bool past_dyn = false;
    for (int c = 0; c < g_cluster.nctas && g_dyn_map != nullptr; ++c) {
      const uintptr_t dyn_end = reinterpret_cast<uintptr_t>(g_blocks[c].dyn) + g_dyn_bytes;
      past_dyn = past_dyn || (a >= dyn_end && a < dyn_end + 2 * g_page);
    }
    const char* what = sig == SIGSEGV ? "segmentation fault" : sig == SIGBUS ? "bus error"
                       : sig == SIGFPE ? "arithmetic exception (integer division by zero?)" : "illegal instruction";
    if (sig == SIGSEGV && a >= guard && a < guard + g_page)
      std::snprintf(g_sig_msg, sizeof g_sig_msg,
                    "thread stack overflow (address %p; raise ATTNFREE_EMU_STACK_KB, now %zu)", si->si_addr,
                    g_cfg.stack_bytes / 1024);
    else if (sig == SIGSEGV && past_dyn)
      std::snprintf(g_sig_msg, sizeof g_sig_msg,
                    "access past the end of dynamic shared memory (%zu bytes requested at launch; address %p)",
                    g_launch ? g_launch->smem : size_t(0), si->si_addr);
    else
      std::snprintf(g_sig_msg, sizeof g_sig_msg, "%s at address %p (a raw-pointer access out of bounds?)", what,
                    si->si_addr);
    siglongjmp(g_jmp, sig);
  }
  // not a kernel thread: let the previous disposition handle it
  sigaction(sig, &g_old_act[sig], nullptr);
}

const int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};

void install_signals() {
  if (g_alt_stack == nullptr) g_alt_stack = static_cast<char*>(std::malloc(kAltStack));
  stack_t ss;
  ss.ss_sp = g_alt_stack;
  ss.ss_size = kAltStack;
  ss.ss_flags = 0;
  sigaltstack(&ss, &g_old_ss);
  struct sigaction act;
  std::memset(&act, 0, sizeof act);
  act.sa_sigaction = &on_signal;
  act.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&act.sa_mask);
  for (int s : kSignals) sigaction(s, &act, &g_old_act[s]);
}

void restore_signals() {
  for (int s : kSignals) sigaction(s, &g_old_act[s], nullptr);
  sigaltstack(&g_old_ss, nullptr);
}

// ------------------------------------------------------------------------------------------------ blocks
// Runs one cluster: CTA `rank` has blockIdx first + its position (x fastest) in the cluster.
void run_cluster(unsigned bx, unsigned by, unsigned bz, const unsigned block[3]) {
  Cluster& C = g_cluster;
  const int n = static_cast<int>(block[0] * block[1] * block[2]);
  blockIdx.x = bx;
  blockIdx.y = by;
  blockIdx.z = bz;
  if (g_cfg.poison) {
    if (g_static_smem)
      for (const auto& o : *g_static_smem) std::memset(o.first, 0xff, o.second);
    char* s0 = +__start_attnfree_emu_shared;
    char* s1 = +__stop_attnfree_emu_shared;
    if (s0 != nullptr && s1 > s0) std::memset(s0, 0xff, static_cast<size_t>(s1 - s0));
  }
  g_failed = false;
  g_runnable.clear();
  C.live = n * C.nctas;
  C.exited = 0;
  C.waiting = 0;
  C.waiters.clear();
  const int nwarps = (n + 31) / 32;
  for (int c = 0; c < C.nctas; ++c) {
    Block& B = g_blocks[c];
    if (g_cfg.poison && g_dyn_bytes) std::memset(B.dyn, 0xff, g_dyn_bytes);
    B.idx.x = bx + static_cast<unsigned>(c) % C.dims[0];
    B.idx.y = by + (static_cast<unsigned>(c) / C.dims[0]) % C.dims[1];
    B.idx.z = bz + static_cast<unsigned>(c) / (C.dims[0] * C.dims[1]);
    B.rank = static_cast<unsigned>(c);
    B.nthreads = n;
    B.live = n;
    B.exited = 0;
    B.bar_waiting = 0;
    B.cl_waiting = 0;
    B.bar_waiters.clear();
    B.warps.resize(static_cast<size_t>(nwarps));
    for (int w = 0; w < nwarps; ++w) {
      Warp& W = B.warps[static_cast<size_t>(w)];
      const int lanes = (n - 32 * w) < 32 ? n - 32 * w : 32;
      W.exists = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
      W.exited = 0;
      W.at_barrier = 0;
      W.groups.clear();
    }
    for (int t = 0; t < n; ++t) {
      const int gid = c * n + t;
      Fiber* f = g_fibers[static_cast<size_t>(gid)].get();
      f->tid = t;
      f->gid = gid;
      f->blk = &B;
      f->warp = t / 32;
      f->lane = t % 32;
      f->idx.x = static_cast<unsigned>(t) % block[0];
      f->idx.y = (static_cast<unsigned>(t) / block[0]) % block[1];
      f->idx.z = static_cast<unsigned>(t) / (block[0] * block[1]);
      f->state = kRunnable;
      fiber_init(f);
      g_runnable.push_back(gid);
    }
  }
  if (sigsetjmp(g_jmp, 1) != 0) {  // a signal in a kernel thread (see on_signal)
    record_fault(700, g_sig_msg);
    g_cur = nullptr;
    return;
  }
  while (!g_failed) {
    if (g_runnable.empty()) {
      if (C.live > 0) report_deadlock();
      break;
    }
    size_t k;
    if (g_cfg.schedule == 0) {
      k = static_cast<size_t>(g_rng.below(g_runnable.size()));
    } else {
      k = 0;
      for (size_t i = 1; i < g_runnable.size(); ++i)
        if (g_runnable[i] < g_runnable[k]) k = i;
    }
    const int t = g_runnable[k];
    g_runnable[k] = g_runnable.back();
    g_runnable.pop_back();
    Fiber* f = g_fibers[static_cast<size_t>(t)].get();
    g_cur = f;
    threadIdx = f->idx;
    blockIdx = f->blk->idx;
    switch_to_fiber(f);
    g_cur = nullptr;
  }
}

uint64_t gcd(uint64_t a, uint64_t b) {
  while (b) {
    const uint64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

void counters_sub(attnfree_emu_counters* out, const attnfree_emu_counters& a, const attnfree_emu_counters& b) {
  const uint64_t* pa = reinterpret_cast<const uint64_t*>(&a);
  const uint64_t* pb = reinterpret_cast<const uint64_t*>(&b);
  uint64_t* po = reinterpret_cast<uint64_t*>(out);
  for (size_t i = 0; i < sizeof(attnfree_emu_counters) / sizeof(uint64_t); ++i) po[i] = pa[i] - pb[i];
}

void copy_str(char* dst, size_t n, const char* src) {
  std::snprintf(dst, n, "%s", src ? src : "");
}

void push_record(const rt::LaunchConfig& cfg, int error, const attnfree_emu_counters* delta) {
  attnfree_emu_launch_record r;
  std::memset(&r, 0, sizeof r);
  copy_str(r.kernel, sizeof r.kernel, cfg.name);
  copy_str(r.file, sizeof r.file, cfg.file);
  copy_str(r.caller, sizeof r.caller, cfg.caller);
  r.line = cfg.line;
  for (int i = 0; i < 3; ++i) {
    r.grid[i] = cfg.grid[i];
    r.block[i] = cfg.block[i];
    r.grid_run[i] = g_grid_run[i];
  }
  r.smem_dynamic = cfg.smem;
  r.error = error;
  for (int i = 0; i < 3; ++i) r.cluster[i] = cfg.cluster[0] != 0 ? cfg.cluster[i] : 1u;
  if (delta) r.counters = *delta;
  g_records.push_back(r);
}

const size_t kDefaultSmem = 48 * 1024;
const size_t kOptinSmem = 227 * 1024;

std::map<const void*, int>& func_smem_attr() {
  if (g_func_smem_attr == nullptr) g_func_smem_attr = new std::map<const void*, int>();
  return *g_func_smem_attr;
}

// One region per CTA, each ending at a guard page: an access past the (128-byte rounded) size faults.
void ensure_dyn_smem(size_t bytes, int nctas) {
  const size_t rounded = (bytes + 127) / 128 * 128;
  const size_t body = (rounded + g_page - 1) / g_page * g_page;
  const size_t stride = body + g_page;
  const size_t need = stride * static_cast<size_t>(nctas);
  if (g_dyn_map == nullptr || g_dyn_map_bytes < need) {
    if (g_dyn_map) munmap(g_dyn_map, g_dyn_map_bytes);
    void* m = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "attnfree_emu: cannot map %zu bytes of shared memory\n", need);
      std::abort();
    }
    g_dyn_map = static_cast<char*>(m);
    g_dyn_map_bytes = need;
  }
  mprotect(g_dyn_map, g_dyn_map_bytes, PROT_READ | PROT_WRITE);
  for (int c = 0; c < nctas; ++c)
    mprotect(g_dyn_map + stride * (static_cast<size_t>(c) + 1) - g_page, g_page, PROT_NONE);
  g_dyn_stride = stride;
  for (int c = 0; c < nctas; ++c) g_blocks[c].dyn = g_dyn_map + stride * (static_cast<size_t>(c) + 1) - g_page - rounded;
  g_dyn_bytes = bytes;
}

}  // namespace

// ------------------------------------------------------------------------------------------------ rt API
namespace detail {
void gptr_fault(const char* what, const Buffer* b, const void* raw, size_t elem_bytes, size_t elem_align) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(raw);
  if (b == nullptr) {
    if (raw == nullptr) rt::fault(700, "%s through a null global pointer", what);
    rt::fault(700, "%s through pointer %p, which is not inside any registered buffer", what, raw);
  }
  const long long off = static_cast<long long>(a - b->begin);
  const long long es = static_cast<long long>(elem_bytes);
  const long long elem = off >= 0 ? off / es : -((-off + es - 1) / es);
  const long long extent = static_cast<long long>((b->end - b->begin) / elem_bytes);
  const int code = std::strncmp(what, "misaligned", 10) == 0 ? 716 : 700;
  if (code == 716)
    rt::fault(code, "%s of buffer '%s' at byte offset %lld: address %p is not %zu-byte aligned", what, b->name, off,
              raw, elem_align);
  if (off % es != 0)
    rt::fault(code, "%s of buffer '%s' at byte offset %lld (element %lld of %zu bytes; the buffer has %lld elements)",
              what, b->name, off, elem, elem_bytes, extent);
  rt::fault(code, "%s of buffer '%s' at index %lld (element size %zu bytes; the buffer has %lld elements)", what,
            b->name, elem, elem_bytes, extent);
}
}  // namespace detail

namespace rt {

void fault(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  const std::string detail = vformat(fmt, ap);
  va_end(ap);
  if (g_cur == nullptr) {
    std::fprintf(stderr, "attnfree_emu: fault outside a kernel thread: %s\n", detail.c_str());
    std::abort();
  }
  record_fault(code, detail.c_str());
  Fiber* f = g_cur;
  switch_to_scheduler(f);  // never resumed: the launch is over
  __builtin_unreachable();
}

const Buffer* lookup(const void* p) { return lookup_impl(reinterpret_cast<uintptr_t>(p)); }
bool allow_unregistered() { return g_cfg.allow_unregistered != 0; }

int syncthreads(int kind, int pred, const char* file, int line) {
  Fiber* f = current_or_die("__syncthreads");
  Block& B = *f->blk;
  Warp& W = B.warps[static_cast<size_t>(f->warp)];
  const unsigned bit = 1u << f->lane;
  static const char* names[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and", "__syncthreads_or"};
  for (const WarpGroup& g : W.groups)
    if (g.mask & bit)
      fault(719, "deadlock: %s (%s:%d) reached while lanes 0x%08x of this warp wait for this lane in %s (%s:%d)",
            names[kind], file, line, g.arrived, g.what, g.file, g.line);
  if (B.exited > 0)
    fault(719,
          "%s (%s:%d) reached after %d thread(s) of the block exited: a barrier must be reached by every thread of "
          "the block",
          names[kind], file, line, B.exited);
  if (B.bar_waiting > 0 && !same_site(B.bar_file, B.bar_line, file, line))
    fault(719, "divergent barrier: this thread reached %s at %s:%d while %d thread(s) wait at %s:%d", names[kind], file,
          line, B.bar_waiting, B.bar_file, B.bar_line);
  if (B.bar_waiting > 0 && B.bar_kind != kind)
    fault(719, "divergent barrier: %s and %s at %s:%d", names[kind], names[B.bar_kind], file, line);
  if (B.cl_waiting > 0)
    fault(719, "divergent barrier: this thread reached %s at %s:%d while %d thread(s) of its block wait at "
          "cluster_sync (%s:%d)", names[kind], file, line, B.cl_waiting, g_cluster.file, g_cluster.line);
  if (B.bar_waiting == 0) {
    B.bar_file = file;
    B.bar_line = line;
    B.bar_kind = kind;
    B.bar_count = 0;
    B.bar_and = 1;
    B.bar_or = 0;
  }
  B.bar_waiting++;
  B.bar_count += pred != 0;
  B.bar_and = B.bar_and && pred != 0;
  B.bar_or = B.bar_or || pred != 0;
  f->state = kWaitBarrier;
  W.at_barrier |= bit;
  B.bar_waiters.push_back(f->gid);
  if (B.bar_waiting == B.live) {
    const int r = kind == 1 ? static_cast<int>(B.bar_count) : kind == 2 ? B.bar_and : kind == 3 ? B.bar_or : 0;
    for (int t : B.bar_waiters) {
      Fiber* o = g_fibers[static_cast<size_t>(t)].get();
      o->bar_result = r;
      o->state = kRunnable;
      B.warps[static_cast<size_t>(o->warp)].at_barrier &= ~(1u << o->lane);
      g_runnable.push_back(t);
    }
    B.bar_waiters.clear();
    B.bar_waiting = 0;
    if (g_in_kernel) ++g_counters.barriers;
  }
  switch_to_scheduler(f);
  return f->bar_result;
}

void warp_collective(unsigned mask, CollectiveFn fn, LaneSlot* slot, const char* what, const char* file, int line) {
  Fiber* f = current_or_die(what);
  Block& B = *f->blk;
  Warp& W = B.warps[static_cast<size_t>(f->warp)];
  const unsigned bit = 1u << f->lane;
  if (!(mask & bit)) fault(719, "%s (%s:%d): the calling lane %d is not in the mask 0x%08x", what, file, line, f->lane, mask);
  if (mask & ~W.exists)
    fault(719, "%s (%s:%d): the mask 0x%08x names lanes that do not exist (this warp has lanes 0x%08x)", what, file,
          line, mask, W.exists);
  if (mask & W.exited)
    fault(719, "%s (%s:%d): lane(s) 0x%08x named in the mask 0x%08x have exited", what, file, line, mask & W.exited,
          mask);
  if (mask & W.at_barrier)
    fault(719, "deadlock: %s (%s:%d): lane(s) 0x%08x named in the mask wait at %s (%s:%d)", what, file, line,
          mask & W.at_barrier, B.bar_waiting > 0 ? "__syncthreads" : "cluster_sync",
          B.bar_waiting > 0 ? B.bar_file : g_cluster.file, B.bar_waiting > 0 ? B.bar_line : g_cluster.line);
  WarpGroup* g = nullptr;
  for (WarpGroup& x : W.groups) {
    if (!(x.mask & mask)) continue;
    if (x.mask != mask)
      fault(719, "%s (%s:%d) with mask 0x%08x overlaps %s (%s:%d) with mask 0x%08x, in which lanes 0x%08x wait", what,
            file, line, mask, x.what, x.file, x.line, x.mask, x.arrived);
    if (x.fn != fn)
      fault(719, "lanes of mask 0x%08x execute different warp collectives: %s (%s:%d) and %s (%s:%d)", mask, what, file,
            line, x.what, x.file, x.line);
    g = &x;
  }
  if (g == nullptr) {
    W.groups.emplace_back();
    g = &W.groups.back();
    g->mask = mask;
    g->arrived = 0;
    g->fn = fn;
    g->what = what;
    g->file = file;
    g->line = line;
    for (auto& s : g->slots) s = nullptr;
  }
  g->slots[f->lane] = slot;
  g->arrived |= bit;
  if (g->arrived == mask) {
    fn(g->slots, mask);  // may fault (then never returns)
    if (g_in_kernel) ++g_counters.warp_collectives;
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u) || l == f->lane) continue;
      Fiber* o = g_fibers[static_cast<size_t>(f->gid - f->lane + l)].get();
      o->state = kRunnable;
      g_runnable.push_back(o->gid);
    }
    W.groups.erase(W.groups.begin() + (g - W.groups.data()));
    yield_current();
  } else {
    f->state = kWaitWarp;
    switch_to_scheduler(f);
  }
}

void maybe_yield() {
  if (g_cur != nullptr && g_cfg.schedule == 0) yield_current();
}

int lane_id() { return current_or_die("lane id")->lane; }
unsigned live_lanes_mask() {
  Fiber* f = current_or_die("__activemask");
  const Warp& W = f->blk->warps[static_cast<size_t>(f->warp)];
  return W.exists & ~W.exited;
}
void register_static_smem(void* p, size_t bytes) {
  if (g_static_smem == nullptr) g_static_smem = new std::vector<std::pair<void*, size_t>>();
  for (const auto& o : *g_static_smem)
    if (o.first == p) return;
  g_static_smem->emplace_back(p, bytes);
  if (g_cfg.poison) std::memset(p, 0xff, bytes);  // first execution, inside the first block that uses it
}
void* dynamic_smem() { return g_cur != nullptr ? g_cur->blk->dyn : g_blocks[0].dyn; }
size_t dynamic_smem_bytes() { return g_dyn_bytes; }
long long clock_ticks() { return g_clock += 4; }

unsigned cluster_ctarank() { return current_or_die("cluster_ctarank")->blk->rank; }
unsigned cluster_num_ctas() { return static_cast<unsigned>(g_cluster.nctas); }

void cluster_sync(const char* file, int line) {
  Fiber* f = current_or_die("cluster_sync");
  Block& B = *f->blk;
  Cluster& C = g_cluster;
  Warp& W = B.warps[static_cast<size_t>(f->warp)];
  const unsigned bit = 1u << f->lane;
  for (const WarpGroup& g : W.groups)
    if (g.mask & bit)
      fault(719, "deadlock: cluster_sync (%s:%d) reached while lanes 0x%08x of this warp wait for this lane in %s (%s:%d)",
            file, line, g.arrived, g.what, g.file, g.line);
  if (C.exited > 0)
    fault(719,
          "cluster_sync (%s:%d) reached after %d thread(s) of the cluster exited: a cluster barrier must be reached "
          "by every thread of every CTA of the cluster",
          file, line, C.exited);
  if (B.bar_waiting > 0)
    fault(719, "divergent barrier: this thread reached cluster_sync at %s:%d while %d thread(s) of its block wait at "
          "__syncthreads (%s:%d)", file, line, B.bar_waiting, B.bar_file, B.bar_line);
  if (C.waiting > 0 && !same_site(C.file, C.line, file, line))
    fault(719, "divergent cluster barrier: this thread reached cluster_sync at %s:%d while %d thread(s) of the cluster "
          "wait at %s:%d", file, line, C.waiting, C.file, C.line);
  if (C.waiting == 0) {
    C.file = file;
    C.line = line;
  }
  C.waiting++;
  B.cl_waiting++;
  f->state = kWaitBarrier;
  W.at_barrier |= bit;
  C.waiters.push_back(f->gid);
  if (C.waiting == C.live) {
    for (int t : C.waiters) {
      Fiber* o = g_fibers[static_cast<size_t>(t)].get();
      o->state = kRunnable;
      o->blk->warps[static_cast<size_t>(o->warp)].at_barrier &= ~(1u << o->lane);
      g_runnable.push_back(t);
    }
    for (int c = 0; c < C.nctas; ++c) g_blocks[c].cl_waiting = 0;
    C.waiters.clear();
    C.waiting = 0;
    if (g_in_kernel) ++g_counters.cluster_barriers;
  }
  switch_to_scheduler(f);
}

void* cluster_map_shared(const void* p, unsigned rank, const char* file, int line) {
  Fiber* f = current_or_die("cluster_map_shared");
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t base = reinterpret_cast<uintptr_t>(f->blk->dyn);
  if (a < base || a > base + g_dyn_bytes)
    fault(700,
          "cluster_map_shared (%s:%d): %p is not inside this CTA's dynamic shared memory ([%p, +%zu bytes)); only "
          "dynamic shared memory is mapped across the cluster",
          file, line, p, f->blk->dyn, g_dyn_bytes);
  if (rank >= static_cast<unsigned>(g_cluster.nctas))
    fault(700, "cluster_map_shared (%s:%d): rank %u, but the cluster has %d CTA(s)", file, line, rank,
          g_cluster.nctas);
  return g_blocks[rank].dyn + (a - base);
}

void static_smem_in_cluster(const char* name, const char* file, int line) {
  fault(719,
        "static shared memory '%s' (%s:%d) used in a cluster launch of %d CTAs: the harness keeps one copy of each "
        "static shared array, so it cannot give every CTA of a cluster its own (use dynamic shared memory)",
        name, file, line, g_cluster.nctas);
}

bool launch_begin(const LaunchConfig& cfg) {
  for (int i = 0; i < 3; ++i) g_grid_run[i] = cfg.grid[i];
  if (g_sticky_error) {
    g_last_error = g_sticky_error;
    push_record(cfg, g_sticky_error, nullptr);
    return false;
  }
  const unsigned long long threads =
      static_cast<unsigned long long>(cfg.block[0]) * cfg.block[1] * cfg.block[2];
  std::string why;
  int code = 0;
  if (threads == 0 || threads > 1024 || cfg.block[0] > 1024 || cfg.block[1] > 1024 || cfg.block[2] > 64) {
    code = 9;  // cudaErrorInvalidConfiguration
    why = format("invalid block (%u,%u,%u): at most 1024 threads, (1024, 1024, 64) per dimension", cfg.block[0],
                 cfg.block[1], cfg.block[2]);
  } else if (cfg.grid[0] == 0 || cfg.grid[1] == 0 || cfg.grid[2] == 0 || cfg.grid[0] > 2147483647u ||
             cfg.grid[1] > 65535u || cfg.grid[2] > 65535u) {
    code = 9;
    why = format("invalid grid (%u,%u,%u): at least 1 and at most (2^31-1, 65535, 65535)", cfg.grid[0], cfg.grid[1],
                 cfg.grid[2]);
  } else if (cfg.cluster[0] != 0 &&
             (cfg.cluster[1] == 0 || cfg.cluster[2] == 0 || cfg.grid[0] % cfg.cluster[0] != 0 ||
              cfg.grid[1] % cfg.cluster[1] != 0 || cfg.grid[2] % cfg.cluster[2] != 0)) {
    code = 912;  // cudaErrorInvalidClusterSize
    why = format("grid (%u,%u,%u) is not a multiple of the cluster dimensions (%u,%u,%u)", cfg.grid[0], cfg.grid[1],
                 cfg.grid[2], cfg.cluster[0], cfg.cluster[1], cfg.cluster[2]);
  } else if (cfg.cluster[0] != 0 &&
             static_cast<unsigned long long>(cfg.cluster[0]) * cfg.cluster[1] * cfg.cluster[2] >
                 static_cast<unsigned long long>(kMaxClusterCtas)) {
    code = 912;
    why = format("cluster (%u,%u,%u) has more than %d CTAs (the portable cluster size limit)", cfg.cluster[0],
                 cfg.cluster[1], cfg.cluster[2], kMaxClusterCtas);
  } else {
    size_t limit = kDefaultSmem;
    if (cfg.func != nullptr) {  // launch through a kernel pointer: that kernel's opt-in
      auto it = func_smem_attr().find(cfg.func);
      if (it != func_smem_attr().end() && static_cast<size_t>(it->second) > limit)
        limit = static_cast<size_t>(it->second);
    } else {  // launch through the <<<>>> rewrite: the kernel's identity is unknown, the largest opt-in applies
      for (const auto& kv : func_smem_attr())
        if (static_cast<size_t>(kv.second) > limit) limit = static_cast<size_t>(kv.second);
    }
    if (cfg.smem > limit) {
      code = 1;  // cudaErrorInvalidValue
      why = format("%zu bytes of dynamic shared memory requested, the limit for this kernel is %zu (above 48 KiB "
                   "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) is required; at most 227 KiB)",
                   cfg.smem, limit);
    }
  }
  if (code) {
    set_error(code, format("attnfree_emu: launch of kernel %s at %s:%d refused: ", cfg.name, cfg.file, cfg.line) + why);
    push_record(cfg, code, nullptr);
    return false;
  }
  return true;
}

void launch_run(const LaunchConfig& cfg, KernelThunk thunk, void* ctx) {
  const attnfree_emu_counters before = g_counters;
  g_launch = &cfg;
  g_thunk = thunk;
  g_thunk_ctx = ctx;
  g_rng.s = g_cfg.seed ^ (0x9e3779b97f4a7c15ull * (++g_launch_index));
  g_rng.next();
  Cluster& C = g_cluster;
  const unsigned cd[3] = {cfg.cluster[0] ? cfg.cluster[0] : 1u, cfg.cluster[0] ? cfg.cluster[1] : 1u,
                          cfg.cluster[0] ? cfg.cluster[2] : 1u};
  for (int i = 0; i < 3; ++i) C.dims[i] = cd[i];
  C.nctas = static_cast<int>(cd[0] * cd[1] * cd[2]);
  unsigned gx = cfg.grid[0];
  if (g_cfg.grid_cap && gx > g_cfg.grid_cap) {  // whole clusters only
    gx = static_cast<unsigned>(g_cfg.grid_cap) / cd[0] * cd[0];
    if (gx == 0) gx = cd[0];
  }
  g_grid_run[0] = gx;
  g_grid_run[1] = cfg.grid[1];
  g_grid_run[2] = cfg.grid[2];
  gridDim = dim3(gx, cfg.grid[1], cfg.grid[2]);
  blockDim = dim3(cfg.block[0], cfg.block[1], cfg.block[2]);
  const int nthreads = static_cast<int>(cfg.block[0] * cfg.block[1] * cfg.block[2]);
  ensure_fibers(nthreads * C.nctas);
  ensure_dyn_smem(cfg.smem, C.nctas);
  install_signals();
  g_in_kernel = 1;
  g_multi_cta_cluster = C.nctas > 1;
  ++g_counters.launches;
  // clusters in shuffled order: i -> (a*i + c) mod total, a coprime with total
  const unsigned ncx = gx / cd[0], ncy = cfg.grid[1] / cd[1], ncz = cfg.grid[2] / cd[2];
  const uint64_t total = static_cast<uint64_t>(ncx) * ncy * ncz;
  uint64_t a = 1, c = 0;
  if (g_cfg.schedule == 0 && total > 1) {
    a = 1 + g_rng.below(total - 1);
    while (gcd(a, total) != 1) a = a % (total - 1) + 1;
    c = g_rng.below(total);
  }
  for (uint64_t i = 0; i < total; ++i) {
    const uint64_t lin = static_cast<uint64_t>((static_cast<unsigned __int128>(a) * i + c) % total);
    const unsigned cx = static_cast<unsigned>(lin % ncx);
    const unsigned cy = static_cast<unsigned>((lin / ncx) % ncy);
    const unsigned cz = static_cast<unsigned>(lin / (static_cast<uint64_t>(ncx) * ncy));
    g_counters.blocks += static_cast<uint64_t>(C.nctas);
    g_counters.threads += static_cast<uint64_t>(nthreads) * static_cast<uint64_t>(C.nctas);
    run_cluster(cx * cd[0], cy * cd[1], cz * cd[2], cfg.block);
    if (g_failed) break;
  }
  g_in_kernel = 0;
  g_multi_cta_cluster = 0;
  restore_signals();
  attnfree_emu_counters delta;
  counters_sub(&delta, g_counters, before);
  push_record(cfg, g_failed ? g_sticky_error : 0, &delta);
  g_launch = nullptr;
  g_cur = nullptr;
  C.nctas = 1;
  for (int i = 0; i < 3; ++i) C.dims[i] = 1;
}

// uncounted math (the __real_ symbols exist because the link wraps these functions)
}  // namespace rt
}  // namespace attnfree_emu

// ------------------------------------------------------------------------------------------------ counted libm
extern "C" {
#define ATTNFREE_EMU_WRAP1(T, name, kind, n)                                                                   \
  T __real_##name(T);                                                                                          \
  T __wrap_##name(T x) {                                                                                       \
    attnfree_emu::count_sfu(attnfree_emu::kind, n);                                                            \
    return __real_##name(x);                                                                                   \
  }
ATTNFREE_EMU_WRAP1(float, expf, kSfuExp, 1)
ATTNFREE_EMU_WRAP1(double, exp, kSfuExp, 1)
ATTNFREE_EMU_WRAP1(float, exp2f, kSfuExp, 1)
ATTNFREE_EMU_WRAP1(double, exp2, kSfuExp, 1)
ATTNFREE_EMU_WRAP1(float, expm1f, kSfuExp, 1)
ATTNFREE_EMU_WRAP1(double, expm1, kSfuExp, 1)
ATTNFREE_EMU_WRAP1(float, exp10f, kSfuExp, 1)
ATTNFREE_EMU_WRAP1(double, exp10, kSfuExp, 1)
ATTNFREE_EMU_WRAP1(float, logf, kSfuLog, 1)
ATTNFREE_EMU_WRAP1(double, log, kSfuLog, 1)
ATTNFREE_EMU_WRAP1(float, log2f, kSfuLog, 1)
ATTNFREE_EMU_WRAP1(double, log2, kSfuLog, 1)
ATTNFREE_EMU_WRAP1(float, log10f, kSfuLog, 1)
ATTNFREE_EMU_WRAP1(double, log10, kSfuLog, 1)
ATTNFREE_EMU_WRAP1(float, log1pf, kSfuLog, 1)
ATTNFREE_EMU_WRAP1(double, log1p, kSfuLog, 1)
ATTNFREE_EMU_WRAP1(float, sqrtf, kSfuSqrt, 1)
ATTNFREE_EMU_WRAP1(double, sqrt, kSfuSqrt, 1)
ATTNFREE_EMU_WRAP1(float, sinf, kSfuTrig, 1)
ATTNFREE_EMU_WRAP1(double, sin, kSfuTrig, 1)
ATTNFREE_EMU_WRAP1(float, cosf, kSfuTrig, 1)
ATTNFREE_EMU_WRAP1(double, cos, kSfuTrig, 1)
ATTNFREE_EMU_WRAP1(float, tanf, kSfuTrig, 1)
ATTNFREE_EMU_WRAP1(double, tan, kSfuTrig, 1)
ATTNFREE_EMU_WRAP1(float, tanhf, kSfuTrig, 1)
ATTNFREE_EMU_WRAP1(double, tanh, kSfuTrig, 1)
#undef ATTNFREE_EMU_WRAP1
float __real_powf(float, float);
float __wrap_powf(float x, float y) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuExp);
  attnfree_emu::count_sfu(attnfree_emu::kSfuLog);
  return __real_powf(x, y);
}
double __real_pow(double, double);
double __wrap_pow(double x, double y) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuExp);
  attnfree_emu::count_sfu(attnfree_emu::kSfuLog);
  return __real_pow(x, y);
}
void __real_sincosf(float, float*, float*);
void __wrap_sincosf(float x, float* s, float* c) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuTrig, 2);
  __real_sincosf(x, s, c);
}
void __real_sincos(double, double*, double*);
void __wrap_sincos(double x, double* s, double* c) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuTrig, 2);
  __real_sincos(x, s, c);
}
void __real___assert_fail(const char*, const char*, unsigned, const char*);
void __wrap___assert_fail(const char* assertion, const char* file, unsigned line, const char* function) {
  if (attnfree_emu::g_in_kernel)
    attnfree_emu::rt::fault(710, "device assertion failed: assert(%s) at %s:%u in %s", assertion, file, line, function);
  __real___assert_fail(assertion, file, line, function);
  std::abort();
}
}  // extern "C"

namespace attnfree_emu {
namespace rt {
float raw_exp2f(float x) { return __real_exp2f(x); }
float raw_log2f(float x) { return __real_log2f(x); }
float raw_expf(float x) { return __real_expf(x); }
float raw_logf(float x) { return __real_logf(x); }
double raw_exp(double x) { return __real_exp(x); }
double raw_log(double x) { return __real_log(x); }
float raw_sinf(float x) { return __real_sinf(x); }
float raw_cosf(float x) { return __real_cosf(x); }
float raw_tanf(float x) { return __real_tanf(x); }
float raw_powf(float x, float y) { return __real_powf(x, y); }
float raw_log10f(float x) { return __real_log10f(x); }
float raw_exp10f(float x) { return __real_exp10f(x); }
float raw_sqrtf(float x) { return __real_sqrtf(x); }
double raw_sqrt(double x) { return __real_sqrt(x); }
}  // namespace rt
}  // namespace attnfree_emu

// ------------------------------------------------------------------------------------------------ CUDA runtime API
using attnfree_emu::g_counters;
using attnfree_emu::g_in_kernel;

namespace {
bool check_device_range(const void* p, size_t n, bool write, const char* what) {
  using namespace attnfree_emu;
  if (n == 0) return true;
  if (g_bufs.empty()) return true;  // no registry in use: unchecked
  const Buffer* b = lookup_impl(reinterpret_cast<uintptr_t>(p));
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::string why;
  if (b == nullptr)
    why = format("%s: [%p, +%zu) is not inside any registered buffer", what, p, n);
  else if (a + n > b->end)
    why = format("%s: [%zu, %zu) bytes exceeds buffer '%s' of %zu bytes", what, static_cast<size_t>(a - b->begin),
                 static_cast<size_t>(a - b->begin) + n, b->name, static_cast<size_t>(b->end - b->begin));
  else if (write && !b->writable)
    why = format("%s: writes to read-only buffer '%s'", what, b->name);
  if (why.empty()) return true;
  set_error(700, "attnfree_emu: " + why);
  if (g_sticky_error == 0) g_sticky_error = 700;
  return false;
}
}  // namespace

extern "C" {

cudaError_t cudaGetLastError(void) {
  using namespace attnfree_emu;
  if (g_sticky_error) return static_cast<cudaError_t>(g_sticky_error);
  const int e = g_last_error;
  g_last_error = 0;
  return static_cast<cudaError_t>(e);
}
cudaError_t cudaPeekAtLastError(void) {
  using namespace attnfree_emu;
  return static_cast<cudaError_t>(g_sticky_error ? g_sticky_error : g_last_error);
}
const char* cudaGetErrorName(cudaError_t e) {
  switch (static_cast<int>(e)) {
    case 0: return "cudaSuccess";
    case 1: return "cudaErrorInvalidValue";
    case 2: return "cudaErrorMemoryAllocation";
    case 9: return "cudaErrorInvalidConfiguration";
    case 101: return "cudaErrorInvalidDevice";
    case 700: return "cudaErrorIllegalAddress";
    case 710: return "cudaErrorAssert";
    case 715: return "cudaErrorIllegalInstruction";
    case 716: return "cudaErrorMisalignedAddress";
    case 719: return "cudaErrorLaunchFailure";
    case 912: return "cudaErrorInvalidClusterSize";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (static_cast<int>(e)) {
    case 0: return "no error";
    case 1: return "invalid argument";
    case 2: return "out of memory";
    case 9: return "invalid configuration argument";
    case 101: return "invalid device ordinal";
    case 700: return "an illegal memory access was encountered";
    case 710: return "device-side assert triggered";
    case 715: return "an illegal instruction was encountered";
    case 716: return "misaligned address";
    case 719: return "unspecified launch failure";
    case 912: return "cluster misconfiguration";
    default: return "unknown error";
  }
}

cudaError_t cudaGetDevice(int* device) {
  if (device) *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDeviceCount(int* count) {
  if (count) *count = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) {
  return static_cast<cudaError_t>(attnfree_emu::g_sticky_error);
}
cudaError_t cudaStreamSynchronize(cudaStream_t) {
  return static_cast<cudaError_t>(attnfree_emu::g_sticky_error);
}

// The modelled device: H200 (sm_90), 132 SMs, 228 KiB shared memory per SM, 227 KiB opt-in per block.
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (value == nullptr) return cudaErrorInvalidValue;
  if (device != 0) return cudaErrorInvalidDevice;
  int v;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: v = 1024; break;
    case cudaDevAttrMaxBlockDimX: v = 1024; break;
    case cudaDevAttrMaxBlockDimY: v = 1024; break;
    case cudaDevAttrMaxBlockDimZ: v = 64; break;
    case cudaDevAttrMaxGridDimX: v = 2147483647; break;
    case cudaDevAttrMaxGridDimY: v = 65535; break;
    case cudaDevAttrMaxGridDimZ: v = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: v = 48 * 1024; break;
    case cudaDevAttrTotalConstantMemory: v = 64 * 1024; break;
    case cudaDevAttrWarpSize: v = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: v = 65536; break;
    case cudaDevAttrMultiProcessorCount: v = 132; break;
    case cudaDevAttrComputeCapabilityMajor: v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: v = 0; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: v = 2048; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: v = 228 * 1024; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: v = 65536; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: v = 227 * 1024; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: v = 32; break;
    case cudaDevAttrL2CacheSize: v = 50 * 1024 * 1024; break;
    case cudaDevAttrGlobalMemoryBusWidth: v = 6144; break;
    case cudaDevAttrConcurrentKernels: v = 1; break;
    case cudaDevAttrIntegrated: v = 0; break;
    case cudaDevAttrManagedMemory: v = 1; break;
    case cudaDevAttrCooperativeLaunch: v = 1; break;
    case cudaDevAttrClusterLaunch: v = 1; break;
    case cudaDevAttrReservedSharedMemoryPerBlock: v = 1024; break;
    default: *value = 0; return cudaErrorInvalidValue;
  }
  *value = v;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  using namespace attnfree_emu;
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > kOptinSmem) {
      set_error(1, format("attnfree_emu: cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize, %d): at "
                          "most %zu bytes (227 KiB) on sm_90",
                          value, kOptinSmem));
      return cudaErrorInvalidValue;
    }
    func_smem_attr()[func] = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) {
    if (value < -1 || value > 100) return cudaErrorInvalidValue;
    return cudaSuccess;
  }
  return cudaSuccess;  // cluster attributes: accepted, not modelled
}

cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* attr, const void* func) {
  using namespace attnfree_emu;
  if (attr == nullptr) return cudaErrorInvalidValue;
  std::memset(attr, 0, sizeof(*attr));
  attr->maxThreadsPerBlock = 1024;
  attr->ptxVersion = 90;
  attr->binaryVersion = 90;
  auto it = func_smem_attr().find(func);
  attr->maxDynamicSharedSizeBytes = it == func_smem_attr().end() ? 48 * 1024 : it->second;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* numBlocks, const void*, int blockSize,
                                                          size_t dynamicSMemSize) {
  if (numBlocks == nullptr || blockSize <= 0) return cudaErrorInvalidValue;
  int by_threads = 2048 / blockSize;
  int by_smem = static_cast<int>((228 * 1024) / (dynamicSMemSize + 1024));
  int n = by_threads < by_smem ? by_threads : by_smem;
  if (n > 32) n = 32;
  *numBlocks = n;  // registers are not modelled
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* devPtr, int value, size_t count, cudaStream_t) {
  using namespace attnfree_emu;
  if (g_sticky_error) return static_cast<cudaError_t>(g_sticky_error);
  if (!check_device_range(devPtr, count, true, "cudaMemsetAsync")) return cudaErrorIllegalAddress;
  std::memset(devPtr, value, count);
  g_counters.memset_bytes += count;
  return cudaSuccess;
}
cudaError_t cudaMemset(void* devPtr, int value, size_t count) { return cudaMemsetAsync(devPtr, value, count, 0); }

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind, cudaStream_t) {
  using namespace attnfree_emu;
  if (g_sticky_error) return static_cast<cudaError_t>(g_sticky_error);
  const bool dst_dev = kind != cudaMemcpyDeviceToHost && kind != cudaMemcpyHostToHost;
  const bool src_dev = kind != cudaMemcpyHostToDevice && kind != cudaMemcpyHostToHost;
  if (dst_dev && !check_device_range(dst, count, true, "cudaMemcpyAsync (destination)")) return cudaErrorIllegalAddress;
  if (src_dev && !check_device_range(src, count, false, "cudaMemcpyAsync (source)")) return cudaErrorIllegalAddress;
  std::memmove(dst, src, count);
  g_counters.memcpy_bytes += count;
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, count, kind, 0);
}

cudaError_t cudaMalloc(void** devPtr, size_t size) {
  using namespace attnfree_emu;
  if (devPtr == nullptr) return cudaErrorInvalidValue;
  void* p = nullptr;
  if (posix_memalign(&p, 256, size ? size : 1) != 0) return cudaErrorMemoryAllocation;
  std::memset(p, 0xff, size);
  std::unique_ptr<BufEntry> e(new BufEntry());
  e->name = "cudaMalloc";
  e->b.begin = reinterpret_cast<uintptr_t>(p);
  e->b.end = e->b.begin + size;
  e->b.name = e->name.c_str();
  e->b.writable = 1;
  e->from_malloc = true;
  g_bufs.push_back(std::move(e));
  *devPtr = p;
  return cudaSuccess;
}
cudaError_t cudaFree(void* devPtr) {
  using namespace attnfree_emu;
  if (devPtr == nullptr) return cudaSuccess;
  for (size_t i = 0; i < g_bufs.size(); ++i)
    if (g_bufs[i]->from_malloc && g_bufs[i]->b.begin == reinterpret_cast<uintptr_t>(devPtr)) {
      g_bufs.erase(g_bufs.begin() + static_cast<std::ptrdiff_t>(i));
      std::free(devPtr);
      return cudaSuccess;
    }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------------------------------------ C API
int attnfree_emu_abi_version(void) { return ATTNFREE_EMU_ABI_VERSION; }

void attnfree_emu_reset(void) {
  using namespace attnfree_emu;
  for (size_t i = g_bufs.size(); i-- > 0;)
    if (!g_bufs[i]->from_malloc) g_bufs.erase(g_bufs.begin() + static_cast<std::ptrdiff_t>(i));
  std::memset(&g_counters, 0, sizeof g_counters);
  g_records.clear();
  g_last_error = 0;
  g_sticky_error = 0;
  g_fault_code = 0;
  g_fault_msg.clear();
  g_launch_index = 0;
}

int attnfree_emu_register(const void* ptr, uint64_t bytes, const char* name, int writable) {
  using namespace attnfree_emu;
  if (ptr == nullptr && bytes != 0) return -1;
  std::unique_ptr<BufEntry> e(new BufEntry());
  e->name = name ? name : "?";
  e->b.begin = reinterpret_cast<uintptr_t>(ptr);
  e->b.end = e->b.begin + bytes;
  e->b.writable = writable != 0;
  e->from_malloc = false;
  e->b.name = e->name.c_str();
  g_bufs.push_back(std::move(e));
  return 0;
}

void attnfree_emu_get_counters(attnfree_emu_counters* out) {
  if (out) *out = attnfree_emu::g_counters;
}
int attnfree_emu_num_launches(void) { return static_cast<int>(attnfree_emu::g_records.size()); }
int attnfree_emu_get_launch(int index, attnfree_emu_launch_record* out) {
  using namespace attnfree_emu;
  if (index < 0 || static_cast<size_t>(index) >= g_records.size() || out == nullptr) return -1;
  *out = g_records[static_cast<size_t>(index)];
  return 0;
}
const char* attnfree_emu_fault_message(void) { return attnfree_emu::g_fault_msg.c_str(); }
int attnfree_emu_fault_code(void) { return attnfree_emu::g_fault_code; }
void attnfree_emu_set_seed(uint64_t seed) { attnfree_emu::g_cfg.seed = seed; }
uint64_t attnfree_emu_get_seed(void) { return attnfree_emu::g_cfg.seed; }
void attnfree_emu_set_schedule(int mode) { attnfree_emu::g_cfg.schedule = mode == 1 ? 1 : 0; }
void attnfree_emu_set_grid_cap(uint64_t cap) { attnfree_emu::g_cfg.grid_cap = cap; }
void attnfree_emu_set_poison(int on) { attnfree_emu::g_cfg.poison = on != 0; }
void attnfree_emu_set_allow_unregistered(int on) { attnfree_emu::g_cfg.allow_unregistered = on != 0; }

}  // extern "C"
