"""Sharpness and curvature of one checkpoint: surface metrics plus the model-based estimators.

Every number goes into one metrics.json row (landscape.metrics.metrics_row). The model-based
estimators cost forwards and HVPs, so `MetricsConfig.which` picks them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor

from landscape import hessian, sharpness
from landscape.metrics import metrics_row, surface_metrics
from landscape.surface import Surface
from ptp_core.data import Split
from ptp_core.model import PromptModel

METRIC_KINDS = ("surface", "hessian", "trace", "sharpness", "input", "calibration", "spectrum")
DEFAULT_METRICS = METRIC_KINDS[:-1]  # spectrum (SLQ, ~150 HVPs) is asked for by name: --metrics ...,spectrum


@dataclass
class MetricsConfig:
    which: tuple[str, ...] = DEFAULT_METRICS
    examples: int = 32  # the first N evaluation examples: HVPs keep the whole graph in memory
    radius: float = 0.5  # surface metrics look at the disc |(alpha, beta)| <= radius (axes in direction units)
    tau: float = 0.1  # flat basin: loss within L0 + tau
    eigenvalues: int = 3
    eigen_tol: float = 1e-4
    max_hvps: int = 200
    trace_hvps: int = 30  # Hutch++ (Meyer et al. 2021): a third sketches the top subspace
    # measurement radii say their unit in their name (training's --rho/--sigma/--epsilon are relative to the
    # embedding table's RMS instead: ptp_core.perturb)
    rho_of_norm: float = 0.05  # worst-case ball radius as a fraction of ||theta||, the trained tensors' norm
    sigma_of_rms: float = 0.01  # average-case noise std as a fraction of the RMS of the trained tensors
    samples: int = 20
    ascent_steps: int = 10
    input_eps_of_norm: float = 0.05  # input-space ball radius as a fraction of each example's text-embedding norm
    spectrum_probes: int = 4  # SLQ (landscape.spectrum): 4 probes x 30 Lanczos steps = 120 HVPs
    spectrum_steps: int = 30
    basin_tau: float = 0.05  # a surface minimum counts as a basin when its persistence (barrier height) >= this loss
    calibration_examples: int = 512  # center_ece on the first N examples of the split: 15 bins need hundreds
    params: str = "prompt"  # prompt: the soft prompt only; all: the head too
    seed: int = 0

    def __post_init__(self):
        self.which = tuple(self.which)
        unknown = sorted(set(self.which) - set(METRIC_KINDS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRIC_KINDS)} (comma-separated)")
        for name in ("examples", "radius", "tau", "eigenvalues", "max_hvps", "trace_hvps", "rho_of_norm",
                     "sigma_of_rms", "ascent_steps", "input_eps_of_norm", "spectrum_probes", "spectrum_steps",
                     "basin_tau", "calibration_examples"):
            if not getattr(self, name) > 0:
                raise ValueError(f"metric setting {name} must be > 0, got {getattr(self, name)}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 for a confidence interval, got {self.samples}")


def measure(model: PromptModel, params: dict[str, Tensor], examples: Split, surface: Surface | None,
            config: MetricsConfig, checkpoint: str = "", method: str = "", seed: int | None = None,
            test_accuracy: float | None = None, input_surface: Surface | None = None) -> dict:
    """One metrics row for a checkpoint: the surface's numbers and the estimators in config.which."""
    # float32 always: sharpness is a difference L(theta + delta) - L(theta) of order 1e-3, below bf16's resolution
    results, settings = {}, {**asdict(config), "dtype": "float32"}
    if "surface" in config.which and surface is not None:
        results["surface"] = surface_metrics(surface.alphas, surface.betas, surface.loss, surface.accuracy,
                                             config.radius, config.tau)
    extra = {}
    if input_surface is not None and "surface" in config.which:
        input_metrics = surface_metrics(input_surface.alphas, input_surface.betas, input_surface.loss,
                                        input_surface.accuracy, config.radius, config.tau)
        extra.update(input_grid_sharpness=input_metrics.grid_sharpness,
                     input_curvature_eigenvalues=input_metrics.curvature_eigenvalues)
    if "surface" in config.which:
        extra.update(surface_topology(surface, config.basin_tau, ""))
        extra.update(surface_topology(input_surface, config.basin_tau, "input_"))
    if "calibration" in config.which:
        extra["center_ece"] = center_ece(model, params, examples.head(config.calibration_examples))
    if set(config.which) - {"surface", "calibration"}:
        results.update(_model_metrics(model, params, examples, config))
    return metrics_row(checkpoint, method, seed, test_accuracy, settings=settings, **results, **extra)


def surface_topology(surface: Surface | None, tau: float, prefix: str) -> dict:
    """persistence (birth, death pairs; the global minimum's death inf) and basins of a complete 2D surface."""
    from landscape.topology import loss_topology

    if surface is None or min(surface.shape) < 2 or not surface.is_complete:
        return {}
    topology = loss_topology(surface.loss, tau)
    return {f"{prefix}persistence": topology.persistence, f"{prefix}basins": topology.basins}


def center_ece(model: PromptModel, params: dict[str, Tensor], examples: Split, bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017; 15 equal-width bins) of the trained prompt on `examples`."""
    import torch

    from landscape.calibration import expected_calibration_error

    probabilities = torch.softmax(model.predict(examples.texts, params), dim=-1).double().numpy()  # (N, C)
    return expected_calibration_error(probabilities, examples.labels, bins)


def _model_metrics(model: PromptModel, params: dict[str, Tensor], examples: Split, config: MetricsConfig) -> dict:
    subset = examples.head(config.examples)
    batch = model.encode(subset.texts, subset.labels)
    names = list(params) if config.params == "all" else ["prompt"]
    held = {k: v.detach() for k, v in params.items() if k not in names}
    trainable = {k: params[k].detach() for k in names}

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return model.loss({**held, **p}, batch).mean()

    flat = hessian.flatten_params(trainable)
    if {"hessian", "trace", "spectrum"} & set(config.which):
        model.check_double_backward()
    out = {}
    if "hessian" in config.which:
        out["eigen"] = hessian.top_eigenvalues(loss_fn, trainable, config.eigenvalues, config.eigen_tol,
                                               config.seed, config.max_hvps)
    if "trace" in config.which:
        out["trace"] = hessian.hutchpp(loss_fn, trainable, config.trace_hvps, config.seed)
    if "sharpness" in config.which:
        out["worst_case"] = sharpness.worst_case_sharpness(loss_fn, trainable, config.rho_of_norm * float(flat.norm()),
                                                         config.ascent_steps, seed=config.seed)
        rms = float(flat.pow(2).mean().sqrt())
        out["average"] = sharpness.average_sharpness(loss_fn, trainable, config.sigma_of_rms * rms, config.samples, config.seed)
    if "input" in config.which:
        loss_input, embeddings, mask = sharpness.input_space_closure(model, params, batch)
        out["input_worst_case"] = sharpness.input_worst_case_sharpness(loss_input, embeddings, mask, config.input_eps_of_norm,
                                                                     config.ascent_steps, seed=config.seed)
        out["input_average"] = sharpness.input_average_sharpness(loss_input, embeddings, mask, config.input_eps_of_norm,
                                                               config.samples, config.seed)
    if "spectrum" in config.which:
        from landscape.spectrum import hessian_min_eigenvalue, hessian_spectrum

        out["spectrum"] = hessian_spectrum(loss_fn, trainable, config.spectrum_probes, config.spectrum_steps,
                                           config.seed)
        out["min_eigen"] = hessian_min_eigenvalue(loss_fn, trainable, config.eigen_tol, config.seed, config.max_hvps)
    return out
