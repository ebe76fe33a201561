"""Benchmark: peak memory and time of selected-token log-probs, naive vs row-loop vs ours.

Three ways to get log p(target) from hidden states [N, H] and an lm_head [V, H]:
  naive    logits = lm_head(h) -> log_softmax -> gather             (holds [N, V] twice)
  rowloop  logits = lm_head(h), then log_softmax + gather over row chunks of 128, the way TRL's
           selective_log_softmax walks rows (our own code): one [N, V] plus a chunk
  ours     kernels.selected_logprobs (torch twin on CPU, Triton on CUDA): no [N, V] at all
Modes: "fwd" under torch.no_grad (reward / reference scoring), "fwd+bwd" with hidden requiring
grad (PPO policy; the lm_head is frozen unless --grad-weight).

Memory: on CPU each (case, impl, mode) runs in a fresh subprocess: extra peak = peak RSS during the
runs minus VmRSS measured after the inputs were allocated (the gradient of hidden, [N, H], counts
for every impl). The peak is the kernel's RSS high-water mark, reset after the inputs exist
(/proc/self/clear_refs) and read from VmHWM, which is what getrusage's ru_maxrss reports for this
process, minus ru_maxrss's inheritance of the spawning process's peak across exec. On CUDA: torch.cuda.max_memory_allocated minus memory_allocated after inputs.
Cases whose estimated extra memory exceeds --max-gib are skipped and printed as such.
Inputs: hidden ~ N(0, 1), W ~ N(0, (2 / sqrt(H))^2), so logits have std ~2 like a real LM head.

    python -m kernels.bench                 # full table (CPU, 2 cores: about 10 minutes)
    python -m kernels.bench --quick         # SmolLM2 shape, N = 1024 and 4096
    python -m kernels.bench --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# ---- plumbing: settings ----
SHAPES = {"SmolLM2-135M": (576, 49152), "Qwen2.5-1.5B": (1536, 151936)}
NS = (1024, 4096, 16384)
IMPLS = ("naive", "rowloop", "ours")
MODES = ("fwd", "fwd+bwd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subset: SmolLM2 shape, N=1024,4096")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of hidden states and lm_head weight")
    p.add_argument("--grad-weight", action="store_true",
                   help="fwd+bwd also differentiates the lm_head weight")
    p.add_argument("--max-gib", type=float, default=16.0,
                   help="skip cases whose estimated extra memory exceeds this (GiB)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs per case, the minimum is reported (CPU: 1 above 1 TFLOP)")
    p.add_argument("--max-tflop", type=float, default=6.0,
                   help="CPU: skip cases needing more GEMM work than this, counted as 1 (fwd) or "
                        "3 (fwd+bwd) N x H x V GEMMs (keeps the full CPU run near 10 minutes)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)    # internal: one subprocess
    return p.parse_args(argv)


# ---- algorithm: the three implementations under test ----
def run_naive(h, w, t):
    from kernels import naive_selected_logprobs
    return naive_selected_logprobs(h, w, t)


def run_rowloop(h, w, t, chunk=128):
    logits = F.linear(h, w)                                 # [N, V] materialised once
    out = [torch.log_softmax(lc.float(), -1).gather(-1, tc[:, None]).squeeze(-1)
           for lc, tc in zip(logits.split(chunk), t.split(chunk))]
    return torch.cat(out)


def run_ours(h, w, t):
    import kernels
    return kernels.selected_logprobs(h, w, t)


RUN = {"naive": run_naive, "rowloop": run_rowloop, "ours": run_ours}


def estimate_gib(impl, mode, n, h, v, dtype, grad_weight):
    """Rough extra peak memory (GiB) from the tensors each path keeps alive."""
    nv, e = n * v, torch.tensor([], dtype=dtype).element_size()
    low = e < 4                                             # bf16: extra fp32 copy of logits
    per = {("naive", "fwd"): 2 * 4 + (e if low else 0),
           ("naive", "fwd+bwd"): 3 * 4 + (e if low else 0),
           ("rowloop", "fwd"): e,
           ("rowloop", "fwd+bwd"): e + 2 * 4}.get((impl, mode), 0)
    extra = per * nv + 4 * n * h * (2 if mode == "fwd+bwd" else 0) + (1 << 25)
    if mode == "fwd+bwd" and grad_weight:
        extra += 4 * v * h * 2
    return extra / 2**30


# ---- plumbing: one measurement (runs in a fresh process on CPU) ----
def _status_bytes(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss():
    """Peak RSS since the last reset. getrusage's ru_maxrss is also max()ed with the RSS of the
    process that spawned us (Linux keeps it across exec), so after a successful reset we read the
    same high-water mark from /proc (VmHWM); elsewhere we fall back to ru_maxrss."""
    hwm = _status_bytes("VmHWM") if _RESET_OK else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)                 # in place: no temporaries in the RSS
    hid = torch.randn(n, h, generator=g, dtype=dtype)
    w = torch.randn(v, h, generator=g, dtype=dtype).mul_(2.0 / h ** 0.5)
    t = torch.randint(0, v, (n,), generator=g)
    return hid.to(device), w.to(device), t.to(device)


_RESET_OK = False


def _reset_peak_rss():
    """Reset the kernel's RSS high-water mark (Linux clear_refs 5) so that the peak covers only
    what happens from now on; if unavailable the peak may include earlier temporaries."""
    global _RESET_OK
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _RESET_OK = True
    except OSError:
        _RESET_OK = False


def _step(impl, mode, hid, w, t, grad_weight):
    if mode == "fwd":
        with torch.no_grad():
            RUN[impl](hid, w, t)
        return
    hid = hid.detach().requires_grad_()
    w = w.detach().requires_grad_(grad_weight)
    logp = RUN[impl](hid, w, t)
    logp.sum().backward()


def measure(impl, mode, n, h, v, dtype, device, grad_weight, repeats):
    dev = torch.device(device)
    # warm up on a tiny shape (library init, primitive caches, Triton compile of the small case)
    _step(impl, mode, *_make_inputs(64, h, 512, dtype, dev, seed=1), grad_weight)
    hid, w, t = _make_inputs(n, h, v, dtype, dev)
    if dev.type == "cuda":
        _step(impl, mode, hid, w, t, grad_weight)           # compile for this shape
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_bytes("VmRSS") or 0
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _step(impl, mode, hid, w, t, grad_weight)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss() - base
    return {"time_s": min(times), "peak_bytes": max(peak, 0)}


def measure_in_subprocess(case):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-m", "kernels.bench", "--case", json.dumps(case)],
                         capture_output=True, text=True, env=env, cwd=root)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- plumbing: table ----
def _fmt_t(r):
    return f"{r['time_s'] * 1e3:,.0f}" if "time_s" in r else r.get("skip", r.get("error", "?"))


def _fmt_m(r):
    return f"{r['peak_bytes'] / 2**20:,.0f}" if "peak_bytes" in r else "-"


def main(argv=None):
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.case:                                            # child process: one measurement
        c = json.loads(args.case)
        res = measure(c["impl"], c["mode"], c["n"], c["h"], c["v"], dtype, args.device,
                      args.grad_weight, c["repeats"])
        print(json.dumps(res))
        return
    shapes = {"SmolLM2-135M": SHAPES["SmolLM2-135M"]} if args.quick else SHAPES
    ns = (1024, 4096) if args.quick else NS
    cpu = torch.device(args.device).type == "cpu"
    print(f"# kernels.bench: device={args.device} dtype={args.dtype} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()} "
          f"grad_weight={args.grad_weight} loadavg={os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for name, (h, v) in shapes.items():
        for n in ns:
            for mode in MODES:
                res = {}
                for impl in IMPLS:
                    est = estimate_gib(impl, mode, n, h, v, dtype, args.grad_weight)
                    if est > args.max_gib:
                        res[impl] = {"skip": f"skipped (est. {est:.1f} GiB)"}
                        continue
                    flops = 2 * n * h * v * (1 if mode == "fwd" else 3)
                    if cpu and flops > args.max_tflop * 1e12:
                        res[impl] = {"skip": f"skipped (est. {flops / 1e12:.0f} TFLOP)"}
                        continue
                    reps = args.repeats if (not cpu or flops < 1e12) else 1
                    case = dict(impl=impl, mode=mode, n=n, h=h, v=v, repeats=reps)
                    res[impl] = (measure_in_subprocess(case) if cpu else
                                 measure(impl, mode, n, h, v, dtype, args.device,
                                         args.grad_weight, reps))
                rows.append((name, n, mode, res))
                print(f"  done {name} N={n} {mode}: " + ", ".join(
                    f"{k} {_fmt_t(r)} ms / {_fmt_m(r)} MiB" for k, r in res.items()),
                    file=sys.stderr, flush=True)
    print("\n| model (H, V) | N | mode | naive ms | rowloop ms | ours ms | naive MiB | rowloop MiB "
          "| ours MiB | mem naive/ours | time ours/naive |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for name, n, mode, res in rows:
        h, v = SHAPES[name]
        nv, ou = res["naive"], res["ours"]
        mem_r = (f"{nv['peak_bytes'] / max(ou['peak_bytes'], 1):.1f}x"
                 if "peak_bytes" in nv and "peak_bytes" in ou else "-")
        t_r = (f"{ou['time_s'] / nv['time_s']:.2f}x"
               if "time_s" in nv and "time_s" in ou else "-")
        print(f"| {name} ({h}, {v}) | {n} | {mode} | " + " | ".join(
            [_fmt_t(res[k]) for k in IMPLS] + [_fmt_m(res[k]) for k in IMPLS]) +
            f" | {mem_r} | {t_r} |")
        if n == 4096 and v == 49152 and mem_r != "-" and t_r != "-":
            ok = float(mem_r[:-1]) >= 10 and float(t_r[:-1]) <= 1.2
            verdicts.append(f"target N=4096 V=49152 {mode}: memory {mem_r} less (>= 10x), "
                            f"time {t_r} of naive (<= 1.2x): {'MET' if ok else 'NOT MET'}")
    print(f"\n(load average at the end: {os.getloadavg()[0]:.2f}; times are the minimum of the "
          f"timed runs; MiB = extra peak memory beyond the inputs)")
    for line in verdicts:
        print(line)
    print_tuned()


def print_tuned():
    """On CUDA: the block sizes kernels.triton_impl.tune() chose for each shape it met."""
    ti = sys.modules.get("kernels.triton_impl")
    if ti is None or not ti._TUNED:
        return
    print("\nautotune (kernels.triton_impl.tune: fastest of CONFIGS, forward + grad_hidden backward "
          "timed on the call's inputs)\n| V | H | dtype | N bucket | entropy | grad_W | chosen "
          "block_n/block_v/block_h/warps | best ms | slowest ms | CONFIG (untuned) ms |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    default = ti._cfg_id(ti.CONFIG)
    for (v, h, dt, nb, _, ent, gw, _), (cfg, times) in ti._TUNED.items():
        t_def = times.get(default)
        print(f"| {v} | {h} | {dt.replace('torch.', '')} | {nb} | {ent} | {gw} | {cfg['block_n']}/"
              f"{cfg['block_v']}/{cfg['block_h']}/{cfg['num_warps']} | {min(times.values()) * 1e3:.3f} "
              f"| {max(times.values()) * 1e3:.3f} | {'-' if t_def is None else f'{t_def * 1e3:.3f}'} |")


if __name__ == "__main__":
    main()
