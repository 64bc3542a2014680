"""Dev-only: dump diffusers scheduler runs as parity fixtures for crates/unitune/src/schedulers.

Run from the repository root with the reference venv:

    /work/pyref/bin/python dev/ref_schedulers.py

Writes tests/fixtures/ref/schedulers.json (one entry per case: scheduler kind, the config JSON text
the Rust side parses, step count, img2img start index, DDIM eta) and
tests/fixtures/ref/schedulers.safetensors holding, per case `cN`:
  cN.timesteps [n] f64, cN.init_noise_sigma [1] f64, cN.add_noise [1,4,4,4] (x0 noised at the first
  timestep run), cN.scaled [k,1,4,4,4] (scale_model_input at each step, Euler kinds only),
  cN.prev [k,1,4,4,4] (prev_sample of each step, fed back as the next sample);
and shared inputs: model_outputs [20,1,4,4,4] (init_noise plus a little noise, as an epsilon model
would say), init_noise, x0 [1,4,4,4], step_noise [20,1,4,4,4]
(every stochastic draw of a case, in order: DDIM eta > 0 gets it as `variance_noise`, DDPM and
Euler ancestral draw it through a patched `randn_tensor` that also checks the shape), plus
schedule tables (betas.squaredcos, alphas_cumprod.<schedule>), training add_noise/get_velocity
with per-sample timesteps (train.<schedule>.{noisy,velocity}, train.x0, train.noise, train.timesteps),
and the timesteps of set_timesteps(n) for every n in table.steps (table.<kind>.<spacing>, all runs
concatenated, with their .lengths).

The loop mirrors diffusers' pipelines: txt2img starts from init_noise * init_noise_sigma; img2img
calls set_begin_index(start) where the scheduler has it and starts from add_noise(x0, init_noise, t).
"""
import json
import os

import torch
from safetensors.torch import save_file

import diffusers.schedulers.scheduling_ddpm as ddpm_mod
import diffusers.schedulers.scheduling_euler_ancestral_discrete as eulera_mod
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "ref")
SHAPE = (1, 4, 4, 4)
MAX_STEPS = 20

CLASSES = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD1_DDIM = open(os.path.join(ROOT, "tests", "fixtures", "tiny-sd1", "scheduler", "scheduler_config.json")).read()
SD2_DDIM = open(os.path.join(ROOT, "tests", "fixtures", "tiny-sd2", "scheduler", "scheduler_config.json")).read()
# An old SD 1.4 style config: PNDM, no timestep_spacing, so each scheduler's own default applies.
OLD_PNDM = json.dumps(
    {"_class_name": "PNDMScheduler", "_diffusers_version": "0.2.2", "skip_prk_steps": True, "steps_offset": 1,
     "set_alpha_to_one": False, "clip_sample": False, **SD}
)

# (kind, config: dict of kwargs or JSON text loaded through from_config, steps, img2img start, eta)
CASES = [
    ("ddim", SD1_DDIM, 10, None, 0.0),
    ("ddim", SD2_DDIM, 10, None, 0.0),
    ("ddim", dict(beta_schedule="linear", timestep_spacing="linspace", prediction_type="sample", clip_sample=True,
                  set_alpha_to_one=True), 7, None, 0.5),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=2.0), 7, None, 0.5),
    ("ddim", dict(**SD, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True), 7, None, 0.0),
    ("ddim", SD1_DDIM, 10, 3, 0.0),
    ("ddim", OLD_PNDM, 10, None, 0.0),
    ("ddpm", dict(**SD, steps_offset=1, clip_sample=False), 10, None, 0.0),
    ("ddpm", dict(timestep_spacing="linspace", prediction_type="v_prediction"), 7, None, 0.0),
    ("ddpm", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", prediction_type="sample"), 7,
     None, 0.0),
    ("euler", SD1_DDIM, 10, None, 0.0),
    ("euler", dict(**SD), 7, None, 0.0),
    ("euler", dict(**SD, timestep_spacing="trailing", prediction_type="v_prediction"), 10, None, 0.0),
    ("euler", dict(prediction_type="sample"), 7, None, 0.0),
    ("euler", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="leading", final_sigmas_type="sigma_min"),
     10, None, 0.0),
    ("euler", SD1_DDIM, 10, 4, 0.0),
    ("euler", OLD_PNDM, 7, None, 0.0),
    ("euler-a", SD1_DDIM, 10, None, 0.0),
    ("euler-a", dict(**SD, prediction_type="v_prediction"), 7, None, 0.0),
    ("euler-a", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="leading"), 10, None, 0.0),
    ("euler-a", dict(**SD), 7, 2, 0.0),
    ("dpm++", SD1_DDIM, 10, None, 0.0),
    ("dpm++", dict(**SD), 7, None, 0.0),
    ("dpm++", SD2_DDIM, 10, None, 0.0),
    ("dpm++", dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample"), 7, None, 0.0),
    ("dpm++", dict(lower_order_final=False, final_sigmas_type="sigma_min"), 7, None, 0.0),
    ("dpm++", SD1_DDIM, 10, 3, 0.0),
    ("dpm++", dict(**SD), 20, None, 0.0),
    ("dpm++", dict(**SD, euler_at_final=True, final_sigmas_type="sigma_min"), 20, None, 0.0),
    ("dpm++", dict(**SD, lambda_min_clipped=-5.1), 10, None, 0.0),
    ("dpm++", dict(**SD, solver_type="heun", solver_order=1), 7, None, 0.0),
    ("dpm++", OLD_PNDM, 7, None, 0.0),
]


class NoiseQueue:
    """Stands in for diffusers' randn_tensor: hands out the fixed step noise in order."""

    def __init__(self, noise):
        self.noise = list(noise)
        self.used = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE, shape
        t = self.noise[self.used].to(dtype)
        self.used += 1
        return t


def make(kind, config):
    cls = CLASSES[kind]
    if isinstance(config, str):
        return cls.from_config(json.loads(config)), config
    sched = cls(**config)
    return sched, sched.to_json_string()


def run_case(name, kind, config, steps, start, eta, shared, tensors):
    sched, config_text = make(kind, config)
    sched.set_timesteps(steps)
    noise = NoiseQueue(shared["step_noise"])
    ddpm_mod.randn_tensor = noise
    eulera_mod.randn_tensor = noise

    timesteps = sched.timesteps
    first = 0 if start is None else start
    t0 = timesteps[first : first + 1]
    add_noise = sched.add_noise(shared["x0"], shared["init_noise"], t0)
    if start is None:
        sample = shared["init_noise"] * sched.init_noise_sigma
    else:
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        sample = add_noise
    init_noise_sigma = float(sched.init_noise_sigma)

    scaled, prev = [], []
    for i, t in enumerate(timesteps[first:]):
        scaled.append(sched.scale_model_input(sample, t))
        kwargs = {}
        if kind == "ddim":
            kwargs = dict(eta=eta, variance_noise=shared["step_noise"][noise.used] if eta > 0 else None)
            noise.used += 1 if eta > 0 else 0
        sample = sched.step(shared["model_outputs"][i], t, sample, **kwargs).prev_sample
        prev.append(sample)

    tensors[f"{name}.timesteps"] = timesteps.to(torch.float64)
    tensors[f"{name}.init_noise_sigma"] = torch.tensor([init_noise_sigma], dtype=torch.float64)
    tensors[f"{name}.add_noise"] = add_noise.contiguous()
    if kind in ("euler", "euler-a"):
        tensors[f"{name}.scaled"] = torch.stack(scaled).contiguous()
    tensors[f"{name}.prev"] = torch.stack(prev).contiguous()
    return dict(name=name, kind=kind, config=config_text, steps=steps, start=start, eta=eta,
                noise_draws=noise.used)


def schedule_tables(tensors):
    sched = {
        "linear": DDPMScheduler(),
        "scaled_linear": DDPMScheduler(**SD),
        "squaredcos_cap_v2": DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
    }
    tensors["betas.squaredcos_cap_v2"] = sched["squaredcos_cap_v2"].betas.contiguous()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((3, 4, 4, 4), generator=g)
    noise = torch.randn((3, 4, 4, 4), generator=g)
    timesteps = torch.tensor([0, 457, 999], dtype=torch.int64)
    tensors["train.x0"], tensors["train.noise"], tensors["train.timesteps"] = x0, noise, timesteps
    for key, s in sched.items():
        tensors[f"alphas_cumprod.{key}"] = s.alphas_cumprod.contiguous()
        tensors[f"train.{key}.noisy"] = s.add_noise(x0, noise, timesteps)
        tensors[f"train.{key}.velocity"] = s.get_velocity(x0, noise, timesteps)


TABLE_STEPS = list(range(1, 31)) + [37, 50, 61, 100, 333]


def timestep_tables(tensors):
    """set_timesteps(n) for many n: DDIM (DDPM's code is the same), Euler (Euler ancestral's
    is the same) and DPM-Solver, each spacing, scaled_linear with steps_offset 1."""
    for kind in ("ddim", "euler", "dpm++"):
        for spacing in ("leading", "trailing", "linspace"):
            sched = CLASSES[kind](**SD, steps_offset=1, timestep_spacing=spacing)
            runs = []
            for n in TABLE_STEPS:
                sched.set_timesteps(n)
                runs.append(sched.timesteps.to(torch.float64))
            tensors[f"table.{kind}.{spacing}"] = torch.cat(runs).to(torch.float32)
            tensors[f"table.{kind}.{spacing}.lengths"] = torch.tensor([len(r) for r in runs], dtype=torch.int64)
    tensors["table.steps"] = torch.tensor(TABLE_STEPS, dtype=torch.int64)


def main():
    g = torch.Generator().manual_seed(0)
    init_noise = torch.randn(SHAPE, generator=g)
    shared = {
        # Roughly what a trained epsilon model says (the initial noise, give or take), so that
        # samples keep realistic magnitudes instead of blowing up through 1 / sqrt(alpha_prod).
        "model_outputs": init_noise + 0.1 * torch.randn((MAX_STEPS, *SHAPE), generator=g),
        "init_noise": init_noise,
        "x0": torch.randn(SHAPE, generator=g),
        "step_noise": torch.randn((MAX_STEPS, *SHAPE), generator=g),
    }
    tensors = dict(shared)
    cases = [run_case(f"c{i}", *case, shared, tensors) for i, case in enumerate(CASES)]
    schedule_tables(tensors)
    timestep_tables(tensors)
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "schedulers.safetensors"))
    with open(os.path.join(OUT, "schedulers.json"), "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")
    print(f"{len(cases)} cases, {os.path.getsize(os.path.join(OUT, 'schedulers.safetensors'))} bytes")


if __name__ == "__main__":
    main()
