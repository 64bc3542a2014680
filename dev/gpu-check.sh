#!/usr/bin/env bash
# The GPU check, in one command of at most 8 minutes on a GPU machine (driver >= 580, Python 3.12
# with torch and the pip CUDA 13 libraries, no Rust, no network), from the repository root:
#
#   dev/gpu-check.sh OUT_DIR             unpack target/cuda-bundle (dev/build-cuda.sh), run the GPU
#                                        tests, then the speed benches beside PyTorch diffusers
#   dev/gpu-check.sh --dry-run OUT_DIR   the same here, without a GPU: the binaries against the
#                                        toolkit's libcuda stub (every call: no device), tests that
#                                        skip, benches on the CPU with the tiny preset
#
# Writes OUT_DIR/gpu-check.json (machine, tests, benches) and the logs tests.log and benches.log.
# Exits non-zero when a test failed or nothing could run; a bench that fails or times out is
# recorded in the report and the next one runs. UNITUNE_CUDA_LIBS overrides where libcublas.so.13,
# libcudart.so.13 and libcurand.so.10 are looked for (default: site-packages/nvidia/*/lib).
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


def run(cmd, log, timeout, env=None):
    """Runs cmd with its output into log; (exit code or "timeout", seconds, output)."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env,
                           stdin=subprocess.DEVNULL)
        code, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        code = "timeout"
        out = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
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
    os.symlink(os.path.join(toolkit, "lib", "stubs", "libcuda.so"), os.path.join(stub, "libcuda.so.1"))
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
device = "cpu" if args.dry_run else "cuda"
preset, iters = ("tiny", "1") if args.dry_run else ("sd15", "3")
dtypes = ["f32"] if args.dry_run else ["bf16", "f16"]
plan = []
for bench in ("tune-step", "unet"):
    for dtype in dtypes if bench == "tune-step" else dtypes[-1:]:
        common = [bench, "--preset", preset, "--batch", "4", "--iters", iters, "--warmup", "1",
                  "--dtype", dtype, "--json"]
        plan.append(("unitune", dtype, [unitune, "bench"] + common + ["--device", device], env))
        torch_cmd = [sys.executable, "dev/bench_torch.py"] + common + ([] if args.dry_run else ["--cuda"])
        plan.append(("torch", dtype, torch_cmd, py_env))


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
for impl, dtype, cmd, cmd_env in plan:
    entry = {"impl": impl, "bench": cmd[cmd.index("--preset") - 1], "preset": preset, "dtype": dtype}
    if impl == "torch" and report["torch"] != "ok":
        entry["skipped"] = "torch or diffusers does not import"
    elif left() < 40:
        entry["skipped"] = "out of time"
    else:
        stop, peak = threading.Event(), [0]
        sampler = threading.Thread(target=gpu_memory_peak, args=(stop, peak)) if smi else None
        if sampler:
            sampler.start()
        code, secs, out = run(cmd, logs["benches.log"], min(150, left() - 20), cmd_env)
        if sampler:
            stop.set()
            sampler.join()
            entry["peak_gpu_mb"] = peak[0]
        entry.update(exit=code, seconds=secs)
        results = [l for l in out.splitlines() if l.startswith("{")]
        if code == 0 and results:
            entry["result"] = json.loads(results[-1])
        else:
            entry["error"] = out.strip().splitlines()[-3:]
    report["benches"].append(entry)
    save()

save()
print(json.dumps(report, indent=1))
failed = [t["name"] for t in report["tests"] if not t["passed"]]
if failed:
    sys.exit(f"gpu-check: tests failed: {', '.join(failed)}")
PY
