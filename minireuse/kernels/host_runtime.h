// CUDA's execution model on the host, for the host build of minireuse's kernels
// (minireuse/kernels/runtime.py). The kernel sources compile unchanged after this header:
//
//   - a launch runs every block of its grid, one block after another, in the
//     order the caller asks (forward or reverse);
//   - each block runs its blockDim threads as real threads (a pool kept for the
//     process), concurrently, or one at a time in thread order (forward or
//     reverse) between barriers: the serial schedules make a missing barrier fail
//     the same way on every run;
//   - __syncthreads() is a barrier of the block's threads. Reaching it after some
//     threads of the block returned is barrier divergence (undefined in CUDA): the
//     launch reports it as an error;
//   - __shared__ arrays are static storage (blocks never overlap, so a block owns
//     them while it runs); dynamic shared memory (extern __shared__) is a buffer
//     of the launch's size, filled with 0xFF bytes before every block and guarded
//     by canary bytes checked after it;
//   - atomics are real atomics (GCC __atomic builtins), __threadfence a full fence.
//
// One launch at a time (the Python side serialises them).
#ifndef MINIREUSE_HOST_RUNTIME_H
#define MINIREUSE_HOST_RUNTIME_H

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

struct uint3 {
    unsigned int x, y, z;
};
typedef uint3 dim3;

namespace mrh {

inline thread_local uint3 thread_idx = {0, 0, 0};
inline thread_local uint3 block_idx = {0, 0, 0};
inline uint3 block_dim = {1, 1, 1};
inline uint3 grid_dim = {1, 1, 1};

enum Schedule { CONCURRENT = 0, SERIAL_FORWARD = 1, SERIAL_REVERSE = 2 };
constexpr int CANARY = 64;                     // guard bytes after the dynamic shared memory
constexpr unsigned char CANARY_BYTE = 0xA5;

struct Worker {
    std::condition_variable cv;
};

class Pool {
  public:
    static Pool& get()
    {
        static Pool* pool = new Pool;    // never destroyed: its threads wait on it until the process ends
        return *pool;
    }

    // Runs body on every thread of every block; returns 0, or writes a message and returns 1.
    int launch(const long long* dims, long long smem, int schedule, int reverse_blocks,
               const std::function<void()>& body, char* message, int message_size)
    {
        std::unique_lock<std::mutex> lk(m_);
        grid_dim = {(unsigned)dims[0], (unsigned)dims[1], (unsigned)dims[2]};
        block_dim = {(unsigned)dims[3], (unsigned)dims[4], (unsigned)dims[5]};
        nthreads_ = (int)(block_dim.x * block_dim.y * block_dim.z);
        nblocks_ = (long long)grid_dim.x * grid_dim.y * grid_dim.z;
        if (nthreads_ <= 0 || nblocks_ <= 0) {
            return 0;
        }
        smem_.assign((size_t)smem + CANARY, CANARY_BYTE);
        smem_bytes_ = smem;
        body_ = &body;
        schedule_ = schedule;
        reverse_blocks_ = reverse_blocks;
        error_.clear();
        while ((int)workers_.size() < nthreads_) {
            workers_.push_back(std::make_unique<Worker>());
            const int i = (int)workers_.size() - 1;
            threads_.emplace_back([this, i] { run(i); });
            threads_.back().detach();
        }
        finished_ = 0;
        start_block(0);
        ++generation_;
        for (int i = 0; i < nthreads_; ++i) {
            workers_[i]->cv.notify_one();
        }
        done_.wait(lk, [this] { return finished_ == nthreads_; });
        body_ = nullptr;
        if (!error_.empty()) {
            std::snprintf(message, (size_t)message_size, "%s", error_.c_str());
            return 1;
        }
        return 0;
    }

    // __syncthreads() of the calling thread.
    void sync()
    {
        std::unique_lock<std::mutex> lk(m_);
        const int t = thread_flat();
        if (exited_ > 0) {
            fail("__syncthreads() reached after " + std::to_string(exited_) + " thread(s) of block " +
                 block_name() + " returned (barrier divergence)");
        }
        waiting_[rank_of(t)] = 1;
        ++arrived_;
        const long long phase = phase_;
        if (arrived_ + exited_ == nthreads_) {
            release_barrier();
        } else {
            pass_token(rank_of(t));
        }
        workers_[t]->cv.wait(lk, [&] { return phase_ != phase && may_run(t); });
    }

    unsigned char* dynamic_shared() { return smem_.data(); }

  private:
    std::mutex m_;
    std::condition_variable done_;
    std::vector<std::unique_ptr<Worker>> workers_;
    std::vector<std::thread> threads_;
    const std::function<void()>* body_ = nullptr;
    std::vector<unsigned char> smem_;
    long long smem_bytes_ = 0;
    int nthreads_ = 0;
    long long nblocks_ = 0;
    int schedule_ = CONCURRENT;
    int reverse_blocks_ = 0;
    long long generation_ = 0;
    int finished_ = 0;
    // the running block
    long long block_ = 0;        // position in the launch's block order
    long long block_gen_ = 0;    // bumps when a block starts
    int arrived_ = 0;            // threads waiting at the current barrier
    int exited_ = 0;             // threads of the block that returned
    long long phase_ = 0;        // bumps when a barrier releases
    int token_ = 0;              // serial schedules: the rank allowed to run
    std::vector<char> waiting_;  // per rank: at the barrier or returned
    std::string error_;

    static int thread_flat()
    {
        return (int)(thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z));
    }

    int rank_of(int t) const { return schedule_ == SERIAL_REVERSE ? nthreads_ - 1 - t : t; }
    int thread_of(int r) const { return schedule_ == SERIAL_REVERSE ? nthreads_ - 1 - r : r; }
    bool may_run(int t) const { return schedule_ == CONCURRENT || token_ == rank_of(t); }

    std::string block_name() const
    {
        return "(" + std::to_string(block_idx.x) + ", " + std::to_string(block_idx.y) + ", " +
               std::to_string(block_idx.z) + ")";
    }

    void fail(const std::string& what)
    {
        if (error_.empty()) {
            error_ = what;
        }
    }

    void start_block(long long position)
    {
        block_ = position;
        arrived_ = exited_ = 0;
        token_ = 0;
        waiting_.assign((size_t)nthreads_, 0);
        std::fill(smem_.begin(), smem_.begin() + smem_bytes_, (unsigned char)0xFF);
        ++block_gen_;
    }

    uint3 block_at(long long position) const
    {
        long long b = reverse_blocks_ ? nblocks_ - 1 - position : position;
        uint3 idx;
        idx.x = (unsigned)(b % grid_dim.x);
        b /= grid_dim.x;
        idx.y = (unsigned)(b % grid_dim.y);
        idx.z = (unsigned)(b / grid_dim.y);
        return idx;
    }

    // Serial schedules: hand the token to the next rank after `rank` that still runs
    // (every rank before it is at the barrier or returned).
    void pass_token(int rank)
    {
        if (schedule_ == CONCURRENT) {
            return;
        }
        for (int r = rank + 1; r < nthreads_; ++r) {
            if (waiting_[r] == 0) {
                token_ = r;
                workers_[thread_of(r)]->cv.notify_one();
                return;
            }
        }
    }

    void release_barrier()
    {
        arrived_ = 0;
        ++phase_;
        // ranks that returned stay done; the others run again from the first
        int first = -1;
        for (int r = 0; r < nthreads_; ++r) {
            if (waiting_[r] == 1) {
                waiting_[r] = 0;
                if (first < 0) {
                    first = r;
                }
            }
        }
        token_ = first < 0 ? 0 : first;
        for (int t = 0; t < nthreads_; ++t) {
            workers_[t]->cv.notify_one();
        }
    }

    // A thread returned from the kernel for the current block.
    void exit_block(int t)
    {
        ++exited_;
        waiting_[rank_of(t)] = 2;
        if (exited_ == nthreads_) {
            check_canary();
            if (block_ + 1 < nblocks_) {
                start_block(block_ + 1);
            } else {
                ++block_gen_;
            }
            for (int i = 0; i < nthreads_; ++i) {
                workers_[i]->cv.notify_one();
            }
            return;
        }
        if (arrived_ > 0 && arrived_ + exited_ == nthreads_) {
            fail("__syncthreads() reached after some thread(s) of block " + block_name() +
                 " returned (barrier divergence)");
            release_barrier();
        } else {
            pass_token(rank_of(t));
        }
    }

    void check_canary()
    {
        for (int i = 0; i < CANARY; ++i) {
            if (smem_[(size_t)smem_bytes_ + i] != CANARY_BYTE) {
                fail("block " + block_name() + " wrote past the " + std::to_string(smem_bytes_) +
                     " bytes of dynamic shared memory");
                std::fill(smem_.begin() + smem_bytes_, smem_.end(), CANARY_BYTE);
                return;
            }
        }
    }

    void run(int t)
    {
        long long seen = 0;
        for (;;) {
            std::unique_lock<std::mutex> lk(m_);
            Worker& me = *workers_[t];
            me.cv.wait(lk, [&] { return generation_ != seen && t < nthreads_; });
            seen = generation_;
            thread_idx.x = (unsigned)(t % block_dim.x);
            thread_idx.y = (unsigned)((t / block_dim.x) % block_dim.y);
            thread_idx.z = (unsigned)(t / (block_dim.x * block_dim.y));
            for (long long position = 0; position < nblocks_; ++position) {
                me.cv.wait(lk, [&] { return block_ == position && waiting_[rank_of(t)] == 0 && may_run(t); });
                const long long gen = block_gen_;
                block_idx = block_at(position);
                lk.unlock();
                (*body_)();
                lk.lock();
                exit_block(t);
                me.cv.wait(lk, [&] { return block_gen_ != gen; });
            }
            if (++finished_ == nthreads_) {
                done_.notify_one();
            }
        }
    }
};

inline void syncthreads() { Pool::get().sync(); }

template <typename T>
inline T atomic_add(T* p, T v)
{
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}

template <typename F, typename U>
inline F atomic_add_float(F* p, F v)
{
    U old_bits = __atomic_load_n(reinterpret_cast<U*>(p), __ATOMIC_SEQ_CST);
    for (;;) {
        F old_value;
        std::memcpy(&old_value, &old_bits, sizeof(F));
        const F new_value = old_value + v;
        U new_bits;
        std::memcpy(&new_bits, &new_value, sizeof(F));
        if (__atomic_compare_exchange_n(reinterpret_cast<U*>(p), &old_bits, new_bits, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
            return old_value;
        }
    }
}

}  // namespace mrh

#define threadIdx (::mrh::thread_idx)
#define blockIdx (::mrh::block_idx)
#define blockDim (::mrh::block_dim)
#define gridDim (::mrh::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() ::mrh::syncthreads()
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
#define MINIREUSE_DYNAMIC_SHARED() (::mrh::Pool::get().dynamic_shared())

inline int atomicAdd(int* p, int v) { return mrh::atomic_add(p, v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return mrh::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return mrh::atomic_add(p, v); }
inline float atomicAdd(float* p, float v) { return mrh::atomic_add_float<float, std::uint32_t>(p, v); }
inline double atomicAdd(double* p, double v) { return mrh::atomic_add_float<double, std::uint64_t>(p, v); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long expected, unsigned long long desired)
{
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
inline int atomicCAS(int* p, int expected, int desired)
{
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
inline unsigned int atomicCAS(unsigned int* p, unsigned int expected, unsigned int desired)
{
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}

// CUDA's min/max overloads for device code (std::min needs equal types)
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b)
{
    return b < a ? b : a;
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b)
{
    return a < b ? b : a;
}

// The generated launch entry of every kernel (runtime.py) calls this.
inline int mrh_launch(const long long* dims, long long smem, int schedule, int reverse_blocks,
                      const std::function<void()>& body, char* message, int message_size)
{
    return mrh::Pool::get().launch(dims, smem, schedule, reverse_blocks, body, message, message_size);
}

#endif  // MINIREUSE_HOST_RUNTIME_H
