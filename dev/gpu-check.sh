#!/usr/bin/env bash
# The GPU check, in one command of at most 8 minutes on a GPU machine (driver >= 580, Python 3.12
# with torch and the pip CUDA 13 libraries, no Rust, no network), from the repository root:
#
#   dev/gpu-check.sh OUT_DIR             unpack target/cuda-bundle (dev/build-cuda.sh), run the GPU
#                                        tests, then the speed benches beside PyTorch diffusers
#   dev/gpu-check.sh --dry-run OUT_DIR   the same here, without a GPU: the binaries against the
#                                        toolkit's libcuda and libcudnn stubs (every call: no
#                                        device), tests that skip, benches on the CPU at tiny sizes
#
# The benches, most wanted first, each unitune beside dev/bench_torch.py on the same shapes, all on
# random weights of SD 1.5's shapes at 512 px: one tune step with f32 master weights (f16
# compute), a 50-step DDIM edit with classifier-free guidance and UniTune's tune (128 steps, batch
# 4, Adafactor, lr 1e-4), both on one random pipeline folder that bench_torch.py make-model writes,
# then the UNet's forward/backward in f16 and a tune step on bf16 weights. "comparison" in the
# report gives unitune's time over PyTorch's for each.
#
# The 8 minutes are a budget the script keeps, not an estimate: every command runs with a timeout
# of what is left of BUDGET_S (less a reserve for what follows), and a bench that would start with
# too little left is skipped ("out of time" in the report). A unitune tune cut short still reports
# its speed (its --log-json has each step's time).
#
# Writes OUT_DIR/gpu-check.json (machine, tests, benches) and the logs tests.log and benches.log.
# Exits non-zero when a test failed or nothing could run; a bench that fails or times out is
# recorded in the report and the next one runs. UNITUNE_CUDA_LIBS overrides where libcublas.so.13,
# libcudart.so.13, libcurand.so.10 and libcudnn.so.9 are looked for (default:
# site-packages/nvidia/*/lib, where PyTorch's CUDA 13 wheels put them).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import argparse, atexit, glob, json, os, shutil, site, subprocess, sys, tarfile, tempfile, threading, time

BUDGET_S = 470  # of the 8 minutes; the rest is slack for start-up and copying the report
start = time.monotonic()
left = lambda: BUDGET_S - (time.monotonic() - start)

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--dry-run", action="store_true")
p.add_argument("--bundle", default="target/cuda-bundle")
args = p.parse_args()
os.makedirs(args.out, exist_ok=True)
report = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
logs = {name: open(os.path.join(args.out, name), "w") for name in ("tests.log", "benches.log")}


def save():
    report["seconds"] = round(time.monotonic() - start, 1)
    with open(os.path.join(args.out, "gpu-check.json"), "w") as f:
        json.dump(report, f, indent=1)


def fail(message):
    report["error"] = message
    save()
    sys.exit(f"gpu-check: {message}")


def run(cmd, log, timeout, env=None, lines=None):
    """Runs cmd with its output into log; (exit code or "timeout", seconds, output). Each output
    line is also appended to `lines` (if given) with the seconds since the start at which it came."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, stdin=subprocess.DEVNULL, errors="replace")
    out = []

    def read():
        for line in proc.stdout:
            out.append(line)
            if lines is not None:
                lines.append((time.monotonic() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        code = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = "timeout"
    reader.join()
    out = "".join(out)
    log.write(out + f"\n[exit {code}, {time.monotonic() - t0:.1f} s]\n\n")
    log.flush()
    return code, round(time.monotonic() - t0, 1), out


# --- The machine ------------------------------------------------------------------------------
smi = shutil.which("nvidia-smi")
if smi:
    q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True)
    report["gpu"] = q.stdout.strip() or q.stderr.strip()
elif not args.dry_run:
    fail("no nvidia-smi: this is not a GPU machine (use --dry-run to check the script without one)")

# --- Unpack the bundle ------------------------------------------------------------------------
archive = os.path.join(args.bundle, "unitune-cuda.tar.xz")
if not os.path.exists(archive):
    fail(f"no {archive}: build it with dev/build-cuda.sh and send target/cuda-bundle along")
work = tempfile.mkdtemp(prefix="unitune-gpu-")
atexit.register(shutil.rmtree, work, ignore_errors=True)
with tarfile.open(archive, "r:xz") as tar:
    tar.extractall(work, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(work)
unitune = os.path.join(work, "bin", "unitune")
tests = sorted(glob.glob(os.path.join(work, "tests", "*")))
report["bundle"] = {"binary": os.path.getsize(unitune), "tests": [os.path.basename(t) for t in tests]}

# --- The CUDA 13 libraries --------------------------------------------------------------------
env = dict(os.environ)
if args.dry_run:
    toolkit = os.environ.get("UNITUNE_CUDA_TOOLKIT",
                             os.path.expanduser("~/.cache/unitune/cuda-13.0"))
    stub = os.path.join(work, "stub")
    os.makedirs(stub)
    for lib, soname in (("libcuda.so", "libcuda.so.1"), ("libcudnn.so", "libcudnn.so.9")):
        if os.path.exists(os.path.join(toolkit, "lib", "stubs", lib)):  # cuDNN's: cudnn builds
            os.symlink(os.path.join(toolkit, "lib", "stubs", lib), os.path.join(stub, soname))
    libs = [stub, os.path.join(toolkit, "lib")]
elif os.environ.get("UNITUNE_CUDA_LIBS"):
    libs = os.environ["UNITUNE_CUDA_LIBS"].split(":")
else:
    roots = site.getsitepackages() + [site.getusersitepackages()]
    libs = sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))})
env["LD_LIBRARY_PATH"] = ":".join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
report["ld_library_path"] = env["LD_LIBRARY_PATH"]
ldd = subprocess.run(["ldd", unitune], capture_output=True, text=True, env=env).stdout
missing = [line.split()[0] for line in ldd.splitlines() if "not found" in line]
if missing:
    fail(f"libraries not found: {', '.join(missing)} (set UNITUNE_CUDA_LIBS to their folders)")

# --- The GPU tests ----------------------------------------------------------------------------
test_env = dict(env, UNITUNE_FIXTURES=os.path.abspath("tests/fixtures"), RUST_BACKTRACE="1")
if not args.dry_run:
    test_env["UNITUNE_REQUIRE_GPU"] = "1"  # a test that cannot find the GPU fails
report["tests"] = []
for exe in tests:
    code, secs, out = run([exe, "--test-threads=1"], logs["tests.log"], min(150, left() - 60), test_env)
    summary = [l for l in out.splitlines() if l.startswith("test result") or "skipped" in l]
    report["tests"].append({"name": os.path.basename(exe), "exit": code, "seconds": secs,
                            "summary": summary[-4:], "passed": code == 0})
    save()
if args.dry_run:
    # Without a GPU, asking for one must fail with a message naming the flag.
    code, _, out = run([unitune, "bench", "unet", "--preset", "tiny", "--device", "cuda"],
                       logs["benches.log"], 60, env)
    errors = [line for line in out.splitlines() if line.startswith("error")]
    report["no_gpu_error"] = {"exit": code, "message": errors[:1]}

# --- diffusers for the PyTorch side -----------------------------------------------------------
py_env = dict(env)
py_deps = os.path.join(work, "python")
wheels = {os.path.basename(w).split("-")[0].lower(): w
          for w in glob.glob(os.path.join(args.bundle, "wheels", "*.whl"))}
has = lambda module: subprocess.run([sys.executable, "-c", f"import {module}"],
                                    capture_output=True).returncode == 0
want = [("diffusers", "diffusers"), ("pillow", "PIL"), ("importlib_metadata", "importlib_metadata"),
        ("zipp", "zipp")]
install = [wheels[name] for name, module in want if name in wheels and not has(module)]
if install:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--target", py_deps] + install, check=False)
    py_env["PYTHONPATH"] = ":".join([py_deps] + [env.get("PYTHONPATH", "")]).rstrip(":")
torch_ok = subprocess.run([sys.executable, "-c", "import torch, diffusers"], env=py_env,
                          capture_output=True, text=True)
report["torch"] = "ok" if torch_ok.returncode == 0 else torch_ok.stderr.strip().splitlines()[-1:]

# --- The benches, side by side ----------------------------------------------------------------
# Here: the tiny shapes on the CPU, f32 where f16 is not needed, a few steps; there: SD 1.5's.
dry = args.dry_run
device = "cpu" if dry else "cuda"
on_device = [] if dry else ["--cuda"]
preset, iters = ("tiny", "1") if dry else ("sd15", "3")
size, tune_steps, edit_steps = (64, 2, 2) if dry else (512, 128, 50)
half = "f16"  # the half precision of the training benches (candle's CPU f16 runs the tiny ones)
bench_torch = [sys.executable, "dev/bench_torch.py"]
model = os.path.join(work, "model")
session = os.path.join(work, "bench.session")
tune_log = os.path.join(work, "tune.jsonl")
tune_image = os.path.abspath("tests/fixtures/ref/tune-input.png")
pipeline_dtype = "f32" if dry else "f16"
model_args = ["--model", model, "--device", device, "--dtype", pipeline_dtype]


def speed_bench(bench, dtype, master):
    """`unitune bench` and `bench_torch.py` with the same arguments."""
    common = [bench, "--preset", preset, "--batch", "4", "--iters", iters, "--warmup", "1",
              "--dtype", dtype, "--json"] + (["--master-weights"] if master else [])
    return [("unitune", [unitune, "bench"] + common + ["--device", device], env),
            ("torch", bench_torch + common + on_device, py_env)]


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else None


def tune_result(out, lines, code):
    """unitune tune's speed from its --log-json lines (there even when it was cut short)."""
    try:
        logged = [json.loads(l) for l in open(tune_log) if l.strip()]
    except (OSError, ValueError):  # no log, or a line cut off by a kill
        logged = []
    seconds = [step["seconds"] for step in logged if "seconds" in step]
    if not seconds:
        return None
    steps = [b - a for a, b in zip(seconds, seconds[1:])]
    return {"bench": "tune", "impl": "candle", "batch": 4, "steps": len(seconds), "size": size,
            "first_step_s": seconds[0], "step_s": round(median(steps) or seconds[0], 4),
            "loop_s": seconds[-1], "finished": code == 0}


def edit_result(out, lines, code):
    """unitune edit's time per edit, from when each `[i/2]` line came to its `wrote` line."""
    starts = [t for t, l in lines if l.startswith("[")]
    ends = [t for t, l in lines if l.startswith("wrote")]
    if code != 0 or len(starts) < 2 or len(ends) < 2:
        return None
    return {"bench": "edit", "impl": "candle", "steps": edit_steps, "size": size,
            "first_edit_s": round(ends[0] - starts[0], 3), "edit_s": round(ends[1] - starts[1], 3)}


def one_step_session():
    """The edit needs a session; a one-step tune makes one (untimed), so that the edit runs before
    the long tune bench and does not depend on it."""
    code, _, _ = run([unitune, "tune", "--image", tune_image, "--steps", "1", "--width", str(size),
                      "--height", str(size), "--output", session] + model_args,
                     logs["benches.log"], min(90, left() - 60), env)
    return code == 0


# (name, dtype, impl, command, environment, timeout cap in seconds, result from the output, what
# must hold first); most wanted first.
plan = [("make-model", pipeline_dtype, "torch",
         bench_torch + ["make-model", "--preset", preset, "--output", model, "--dtype", pipeline_dtype,
                        "--json"] + on_device, py_env, 120, None, None)]
plan += [("tune-step", f"{half}+f32 master", impl, cmd, cmd_env, 120, None, None)
         for impl, cmd, cmd_env in speed_bench("tune-step", half, True)]
plan += [
    ("edit", pipeline_dtype, "torch",
     bench_torch + ["edit", "--model", model, "--steps", str(edit_steps), "--size", str(size),
                    "--guidance", "10", "--dtype", pipeline_dtype, "--json"] + on_device,
     py_env, 90, None, None),
    ("edit", pipeline_dtype, "unitune",
     [unitune, "edit", "--session", session, "--prompt", "a dog", "--prompt", "a cat", "--steps",
      str(edit_steps), "--scheduler", "ddim", "--guidance", "10", "--seed", "0", "--output",
      os.path.join(work, "edit.png")] + model_args, env, 90, edit_result, one_step_session),
    ("tune", pipeline_dtype, "torch",
     bench_torch + ["tune", "--model", model, "--steps", str(tune_steps), "--size", str(size),
                    "--batch", "4", "--lr", "1e-4", "--dtype", pipeline_dtype, "--master-weights",
                    "--json"] + on_device, py_env, 150, None, None),
    ("tune", pipeline_dtype, "unitune",
     [unitune, "tune", "--image", tune_image, "--steps", str(tune_steps), "--batch", "4", "--lr",
      "1e-4", "--optimizer", "adafactor", "--layers", "most", "--width", str(size), "--height",
      str(size), "--seed", "0", "--log-json", tune_log, "--output",
      os.path.join(work, "tuned.session")] + model_args, env, 200, tune_result, None),
]
plan += [("unet", half, impl, cmd, cmd_env, 90, None, None)
         for impl, cmd, cmd_env in speed_bench("unet", half, False)]
if not dry:  # candle has no bf16 matrix multiply on the CPU
    plan += [("tune-step", "bf16", impl, cmd, cmd_env, 90, None, None)
             for impl, cmd, cmd_env in speed_bench("tune-step", "bf16", False)]


def gpu_memory_peak(stop, peak):
    """Samples the GPU's used memory (MiB) until stop is set: a peak both sides report alike."""
    while not stop.is_set():
        q = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
        try:
            peak[0] = max(peak[0], int(q.stdout.split()[0]))
        except (ValueError, IndexError):
            pass
        stop.wait(0.2)


report["benches"] = []
for name, dtype, impl, cmd, cmd_env, cap, parse, prepare in plan:
    entry = {"impl": impl, "bench": name, "preset": preset, "dtype": dtype}
    needs_model = name in ("tune", "edit") and not os.path.exists(os.path.join(model, "model_index.json"))
    if impl == "torch" and report["torch"] != "ok":
        entry["skipped"] = "torch or diffusers does not import"
    elif needs_model:
        entry["skipped"] = "no model folder (make-model did not run)"
    elif left() < 40:
        entry["skipped"] = "out of time"
    elif prepare and not prepare():
        entry["skipped"] = "could not prepare (see benches.log)"
    else:
        stop, peak = threading.Event(), [0]
        sampler = threading.Thread(target=gpu_memory_peak, args=(stop, peak)) if smi else None
        if sampler:
            sampler.start()
        lines = []
        code, secs, out = run(cmd, logs["benches.log"], min(cap, left() - 20), cmd_env, lines)
        if sampler:
            stop.set()
            sampler.join()
            entry["peak_gpu_mb"] = peak[0]
        entry.update(exit=code, seconds=secs)
        results = [l for l in out.splitlines() if l.startswith("{")]
        result = parse(out, lines, code) if parse else (
            json.loads(results[-1]) if code == 0 and results else None)
        if result:
            entry["result"] = result
        if code != 0:
            entry["error"] = out.strip().splitlines()[-3:]
    if name == "make-model" and dry and not os.path.exists(os.path.join(model, "model_index.json")):
        # Without torch here, the tiny fixture (the tiny preset's shapes) stands in.
        shutil.copytree("tests/fixtures/tiny-sd1", model, dirs_exist_ok=True)
        entry["fallback"] = "tests/fixtures/tiny-sd1"
    report["benches"].append(entry)
    save()

# unitune's time over PyTorch's, per bench and measure: < 1 is faster.
measures = {"tune-step": "step_s", "unet": "forward_backward_s", "tune": "step_s", "edit": "edit_s"}
report["comparison"] = []
for name, dtype in dict.fromkeys((e["bench"], e["dtype"]) for e in report["benches"]):
    if name not in measures:
        continue
    times = {e["impl"]: e.get("result", {}).get(measures[name])
             for e in report["benches"] if (e["bench"], e["dtype"]) == (name, dtype)}
    ours, theirs = times.get("unitune"), times.get("torch")
    report["comparison"].append({"bench": name, "dtype": dtype, "measure": measures[name],
                                 "unitune": ours, "torch": theirs,
                                 "ratio": round(ours / theirs, 3) if ours and theirs else None})

save()
print(json.dumps(report, indent=1))
failed = [t["name"] for t in report["tests"] if not t["passed"]]
if failed:
    sys.exit(f"gpu-check: tests failed: {', '.join(failed)}")
PY
