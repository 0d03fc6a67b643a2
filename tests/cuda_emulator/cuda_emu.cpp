// The fiber scheduler behind cuda_emu.h.
#include "cuda_emu.h"

#include <vector>

EmuFiber* emu_cur;
emu_dim3 emu_block_idx, emu_block_dim, emu_grid_dim;
EmuWarp emu_warps[32];
int emu_block_count, emu_live;
unsigned long emu_block_gen;

static ucontext_t emu_scheduler;
static std::vector<EmuFiber> fibers;
static std::vector<char*> stacks;
static const std::function<void()>* emu_body;
static const size_t STACK_BYTES = 128 * 1024;

void emu_yield() { swapcontext(&emu_cur->ctx, &emu_scheduler); }

static void emu_entry() {
  (*emu_body)();
  emu_cur->done = true;
  --emu_live;
  // threads that have exited no longer count at __syncthreads (as on the GPU)
  if (emu_live > 0 && emu_block_count == emu_live) { emu_block_count = 0; ++emu_block_gen; }
  swapcontext(&emu_cur->ctx, &emu_scheduler);
}

unsigned emu_activemask() {
  unsigned mask = 0;
  for (auto& f : fibers)
    if (f.warp == emu_cur->warp && !f.done) mask |= 1u << f.lane;
  return mask;
}

static unsigned long warp_generations() {
  unsigned long sum = 0;
  for (auto& w : emu_warps) sum += w.gen;
  return sum;
}

void emu_launch(const std::function<void()>& body, emu_dim3 grid, emu_dim3 block) {
  int n = block.x * block.y * block.z;
  if (n > 1024) { fprintf(stderr, "EMU: a block of %d threads\n", n); abort(); }
  emu_body = &body;
  emu_grid_dim = grid;
  emu_block_dim = block;
  fibers.assign(n, EmuFiber{});
  while ((int)stacks.size() < n) stacks.push_back((char*)malloc(STACK_BYTES));
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        emu_block_idx = {bx, by, bz};
        emu_block_count = 0;
        emu_live = n;
        for (auto& w : emu_warps) w.count = 0;
        for (int i = 0; i < n; ++i) {
          EmuFiber& f = fibers[i];
          f.tid = {(unsigned)(i % block.x), (unsigned)(i / block.x % block.y), (unsigned)(i / (block.x * block.y))};
          f.lane = i % 32;
          f.warp = i / 32;
          f.done = false;
          f.waiting = 0;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stacks[i];
          f.ctx.uc_stack.ss_size = STACK_BYTES;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, emu_entry, 0);
        }
        for (int live = n; live > 0;) {
          unsigned long block_gen = emu_block_gen, warp_gen = warp_generations();
          int finished = 0;
          for (int i = 0; i < n; ++i) {
            if (fibers[i].done) continue;
            emu_cur = &fibers[i];
            swapcontext(&emu_scheduler, &fibers[i].ctx);
            if (fibers[i].done) ++finished;
          }
          live -= finished;
          if (live > 0 && !finished && block_gen == emu_block_gen && warp_gen == warp_generations()) {
            int at_sync = 0;
            for (auto& f : fibers) at_sync += !f.done && f.waiting == 1;
            fprintf(stderr, "EMU: deadlock in block (%u,%u,%u): %d threads at __syncthreads, %d at a shuffle\n",
                    bx, by, bz, at_sync, live - at_sync);
            abort();
          }
        }
      }
}
