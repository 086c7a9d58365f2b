// c10d collectives for longmix: TCPStore rendezvous, Gloo (CPU) and NCCL (CUDA) process groups,
// and the handful of collectives data parallelism needs, behind a C ABI (see src/c10d.rs).
// The calling convention is ffi.h's.

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <string>
#include <vector>

#include "ffi.h"

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
    c10::intrusive_ptr<c10d::Backend> b;
    if (backend == 0) {
      // create_default honours GLOO_SOCKET_IFNAME, like torch.distributed.
      auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
      b = c10::make_intrusive<c10d::ProcessGroupGloo>(c10::make_intrusive<c10d::PrefixStore>("gloo", store), rank,
                                                        world, opts);
    } else {
#ifdef LONGMIX_NCCL
      setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      b = c10::make_intrusive<c10d::ProcessGroupNCCL>(c10::make_intrusive<c10d::PrefixStore>("nccl", store), rank,
                                                        world, opts);
      if (device >= 0) {
        // What init_process_group(device_id=...) does: collectives and the barrier use this
        // device, and the communicator is made now (its errors surface at start).
        at::Device d(at::kCUDA, static_cast<c10::DeviceIndex>(device));
        b->setBoundDeviceId(d);
        b->eagerConnectSingleDevice(d);
      }
#else
      TORCH_CHECK(false, "this build of longmix has no NCCL: rebuild after launch/setup.sh installed its headers");
#endif
    }
    auto g = new LmGroup();
    g->store = store;
    g->backend = b;
    g->timeout = timeout;
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
