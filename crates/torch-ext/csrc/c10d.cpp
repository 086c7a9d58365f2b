// c10d collectives for longmix: TCPStore rendezvous, Gloo (CPU) and NCCL (CUDA) process groups,
// the handful of collectives data parallelism needs and the differentiable all-to-all of context
// parallelism, behind a C ABI (see src/c10d.rs).
// The calling convention is ffi.h's.

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <string>
#include <vector>

#include "ffi.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LONGMIX_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

using lm::dup;
using lm::guard;

struct LmGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  std::atomic<bool> stop{false};
  std::thread heartbeat;
  bool shut_down = false;
  // Nanoseconds spent in all-to-all exchanges (forward and backward), as the host waited.
  std::atomic<long long> exchange_ns{0};

  void stop_heartbeat() {
    stop = true;
    if (heartbeat.joinable()) heartbeat.join();
  }

  // The backend's orderly end (NCCL: finalize and destroy its communicators; an aborted one,
  // after a failed collective, is skipped). Dropping a ProcessGroupNCCL without it warns and
  // aborts its communicators instead.
  void shutdown() {
    if (shut_down) return;
    shut_down = true;
    backend->shutdown();
    stop_heartbeat();
  }

  ~LmGroup() {
    try {
      shutdown();
    } catch (...) {
    }
    stop_heartbeat();
  }
};

struct LmWork {
  c10::intrusive_ptr<c10d::Work> work;
  std::chrono::milliseconds timeout;
};

// A Gloo (backend 0) or NCCL (1) backend of `world` ranks over `store`; `device` >= 0 binds NCCL
// to that CUDA device (the caller made it current).
static c10::intrusive_ptr<c10d::Backend> make_backend(int backend, const c10::intrusive_ptr<c10d::Store>& store,
                                                      int rank, int world, std::chrono::milliseconds timeout,
                                                      int device) {
  if (backend == 0) {
    // create_default honours GLOO_SOCKET_IFNAME, like torch.distributed.
    auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
    return c10::make_intrusive<c10d::ProcessGroupGloo>(c10::make_intrusive<c10d::PrefixStore>("gloo", store), rank,
                                                        world, opts);
  }
#ifdef LONGMIX_NCCL
  setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  auto b = c10::make_intrusive<c10d::ProcessGroupNCCL>(c10::make_intrusive<c10d::PrefixStore>("nccl", store), rank,
                                                       world, opts);
  if (device >= 0) {
    // What init_process_group(device_id=...) does: collectives and the barrier use this
    // device, and the communicator is made now (its errors surface at start).
    at::Device d(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    b->setBoundDeviceId(d);
    b->eagerConnectSingleDevice(d);
  }
  return b;
#else
  TORCH_CHECK(false, "this build of longmix has no NCCL: rebuild after launch/setup.sh installed its headers");
#endif
}

extern "C" {

void lm_string_free(char* s) { std::free(s); }

int lm_nccl_compiled() {
#ifdef LONGMIX_NCCL
  return 1;
#else
  return 0;
#endif
}

// backend: 0 = Gloo, 1 = NCCL. `is_server`: this process hosts the TCPStore (rank 0 of a plain
// launch); under torchrun's agent store every rank is a client. `device`: the CUDA device NCCL is
// bound to (the caller made it current), -1 for none.
//
// NCCL runs with blocking waits (TORCH_NCCL_BLOCKING_WAIT=1 unless the environment says
// otherwise): every wait here passes `timeout` and names the failure itself, while NCCL's
// watchdog would instead abort the process on its own limit (its default error handling), often
// before the message naming the dead or hung rank is printed.
char* lm_group_new(int backend, const char* host, int port, int rank, int world, int is_server,
                   long long timeout_ms, const char* prefix, int device, LmGroup** out) {
  return guard([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = is_server != 0;
    so.numWorkers = is_server ? std::optional<std::size_t>(world) : std::nullopt;
    so.waitWorkers = false;
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto g = new LmGroup();
    g->store = store;
    g->backend = make_backend(backend, store, rank, world, timeout, device);
    g->timeout = timeout;
    *out = g;
  });
}

// A group of `size` ranks of `parent`'s run (this one is `rank` in it), on the same store under
// `name` and with the same timeout; only its members build it.
char* lm_group_sub(LmGroup* parent, int backend, const char* name, int rank, int size, int device, LmGroup** out) {
  return guard([&] {
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(std::string(name), parent->store);
    auto g = new LmGroup();
    g->store = store;
    g->backend = make_backend(backend, store, rank, size, parent->timeout, device);
    g->timeout = parent->timeout;
    *out = g;
  });
}

// Shut the group down (see LmGroup::shutdown); call it once every rank is done with it.
char* lm_group_shutdown(LmGroup* g) {
  return guard([&] { g->shutdown(); });
}

void lm_group_free(LmGroup* g) { delete g; }

}  // extern "C"

// Give a started operation to the caller (`work` not NULL) or wait for it here.
static void hand_over(LmGroup* g, const c10::intrusive_ptr<c10d::Work>& w, LmWork** work) {
  if (work) {
    *work = new LmWork{w, g->timeout};
  } else {
    w->wait(g->timeout);
  }
}

extern "C" {

// op: 0 = sum, 1 = max, 2 = min. With `work` NULL the call waits; otherwise it returns a handle.
char* lm_allreduce(LmGroup* g, void* tensor, int op, LmWork** work) {
  return guard([&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions o;
    o.reduceOp = op == 0 ? c10d::ReduceOp::SUM : op == 1 ? c10d::ReduceOp::MAX : c10d::ReduceOp::MIN;
    o.timeout = g->timeout;
    auto w = g->backend->allreduce(ts, o);
    hand_over(g, w, work);
  });
}

// Sum into rank `root`'s tensor (the others' are left unspecified).
char* lm_reduce(LmGroup* g, void* tensor, int root, LmWork** work) {
  return guard([&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::ReduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.rootRank = root;
    o.timeout = g->timeout;
    auto w = g->backend->reduce(ts, o);
    hand_over(g, w, work);
  });
}

char* lm_broadcast(LmGroup* g, void* tensor, int root, LmWork** work) {
  return guard([&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g->timeout;
    auto w = g->backend->broadcast(ts, o);
    hand_over(g, w, work);
  });
}

char* lm_barrier(LmGroup* g) {
  return guard([&] {
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    g->backend->barrier(o)->wait(g->timeout);
  });
}

char* lm_work_wait(LmWork* w) {
  return guard([&] { w->work->wait(w->timeout); });
}

int lm_work_is_completed(LmWork* w) {
  try {
    return w->work->isCompleted() ? 1 : 0;
  } catch (...) {
    return 1;  // the error comes out of lm_work_wait
  }
}

void lm_work_free(LmWork* w) { delete w; }

char* lm_store_set(LmGroup* g, const char* key, const char* value) {
  return guard([&] { g->store->set(std::string(key), std::string(value)); });
}

// The value of `key`, or an error when it does not appear within `timeout_ms`.
char* lm_store_get(LmGroup* g, const char* key, long long timeout_ms, char** value) {
  return guard([&] {
    g->store->wait({std::string(key)}, std::chrono::milliseconds(timeout_ms));
    auto bytes = g->store->get(std::string(key));
    *value = dup(std::string(bytes.begin(), bytes.end()));
  });
}

// Add `delta` to the counter `key` (created at 0) and give its new value; delta 0 reads it.
char* lm_store_add(LmGroup* g, const char* key, long long delta, long long* value) {
  return guard([&] { *value = g->store->add(std::string(key), delta); });
}

// Count up `key` every `interval_ms` on a thread of its own (with its own store connection),
// until the group is freed: a rank whose counter stops moving has died or hangs.
char* lm_heartbeat_start(LmGroup* g, const char* key, long long interval_ms) {
  return guard([&] {
    TORCH_CHECK(!g->heartbeat.joinable(), "the heartbeat is already running");
    auto store = g->store->clone();
    std::string k(key);
    g->heartbeat = std::thread([g, store, k, interval_ms] {
      long long n = 0;
      while (!g->stop) {
        try {
          store->set(k, std::to_string(++n));
        } catch (...) {
          // The store host is gone; the next collective reports it.
        }
        for (long long t = 0; t < interval_ms && !g->stop; t += 20) {
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      }
    });
  });
}

}  // extern "C"

// Context parallelism's exchange: chunk i of `x` along dim 0 goes to rank i, and chunk i of the
// result came from rank i (equal chunks; NCCL and Gloo both implement `alltoall_base`). A
// failure's message starts with the words the trainer recognises (src/c10d.rs,
// EXCHANGE_FAILED), also when it is thrown inside the autograd engine's backward.
static at::Tensor exchange(LmGroup* g, const at::Tensor& x) {
  auto start = std::chrono::steady_clock::now();
  try {
    auto in = x.contiguous();
    auto out = at::empty_like(in);
    std::vector<int64_t> equal;
    c10d::AllToAllOptions o;
    o.timeout = g->timeout;
    g->backend->alltoall_base(out, in, equal, equal, o)->wait(g->timeout);
    g->exchange_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
    return out;
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "context-parallel all-to-all failed: ", e.what_without_backtrace());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "context-parallel all-to-all failed: ", e.what());
  }
}

// The exchange as an autograd function. It is its own inverse: the gradient of the chunk that
// came from rank i goes back to rank i, which is the same exchange applied to the gradient. So
// the backward is the forward's collective again, and every rank of the group runs it at the
// same point of its backward.
struct AllToAll : public torch::autograd::Function<AllToAll> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t group) {
    ctx->saved_data["group"] = group;
    return exchange(reinterpret_cast<LmGroup*>(group), x);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    auto g = reinterpret_cast<LmGroup*>(ctx->saved_data["group"].toInt());
    return {exchange(g, grad[0]), at::Tensor()};
  }
};

extern "C" {

// `*out` = the exchange of `x` (dim 0 a multiple of the group's size), recorded by autograd.
char* lm_all_to_all(LmGroup* g, const at::Tensor* x, at::Tensor** out) {
  return guard([&] { *out = new at::Tensor(AllToAll::apply(*x, reinterpret_cast<int64_t>(g))); });
}

long long lm_group_exchange_ns(LmGroup* g) { return g->exchange_ns.load(); }

}  // extern "C"
