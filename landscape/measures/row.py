"""One metrics.json row per checkpoint: surface metrics, topology, calibration and the model-based estimators.

The model-based estimators cost forwards and HVPs, so `MetricsConfig.which` picks them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from landscape import hessian
from landscape.grid.spec import PARAM_SCOPES
from landscape.measures import sharpness
from landscape.measures.calibration import expected_calibration_error
from landscape.measures.layer_curvature import layer_curvature
from landscape.measures.spectrum import hessian_min_eigenvalue, hessian_spectrum
from landscape.measures.surface_metrics import SurfaceMetrics, surface_metrics
from landscape.measures.topology import loss_topology
from landscape.surface import Surface
from ptp_core.model import lm
from ptp_core.model.prompt_model import PromptModel
from ptp_core.tasks.task import Split

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
    # embedding table's RMS instead: ptp_core.training.perturb)
    # worst-case ball radius as a fraction of ||theta||, the trained tensors' norm; the adaptive ball
    # ||delta / |theta| || <= rho_of_norm * sqrt(N) has the same rho_of_norm * theta on its boundary
    rho_of_norm: float = 0.05
    # average-case noise std per coordinate as a fraction of the reference's RMS (theta in prompt space, each
    # example's text-token embeddings in input space): E||delta||^2 = sigma_of_rms^2 ||reference||^2 in both
    sigma_of_rms: float = 0.01
    samples: int = 20  # perturbed forwards per average: samples // 2 antithetic pairs (delta, -delta)
    ascent_steps: int = 10
    input_eps_of_norm: float = 0.05  # input-space ball radius as a fraction of each example's text-embedding norm
    spectrum_probes: int = 4  # SLQ (landscape.spectrum): 4 probes x 30 Lanczos steps = 120 HVPs
    spectrum_steps: int = 30
    basin_tau: float = 0.05  # a surface minimum counts as a basin when its persistence (barrier height) >= this loss
    calibration_examples: int = 512  # center_ece on the first N examples of the split: 15 bins need hundreds
    param_scope: str = "prompt"  # one of PARAM_SCOPES: prompt: the soft prompt only; all: the head too
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
        if self.param_scope not in PARAM_SCOPES:
            raise ValueError(f"unknown params {self.param_scope!r}; use one of {', '.join(PARAM_SCOPES)}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.samples < 4:
            raise ValueError(f"samples must be >= 4 (two antithetic pairs for a confidence interval), got {self.samples}")


def measure(model: PromptModel, params: dict[str, Tensor], split: Split, surface: Surface | None,
            config: MetricsConfig, checkpoint: str = "", method: str = "", seed: int | None = None,
            test_accuracy: float | None = None, input_surface: Surface | None = None,
            test_metrics: dict[str, float] | None = None) -> dict:
    """One metrics row for a checkpoint: the surface's numbers and the estimators in config.which, on the first
    config.examples (calibration: config.calibration_examples) examples of `split`; test_metrics (the task's
    metric from ptp.json, e.g. {"test_f1": 0.8}) go beside test_accuracy."""
    # float32 always: sharpness is a difference L(theta + delta) - L(theta) of order 1e-3, below bf16's resolution
    results, settings = {}, metric_settings(config, surface)
    if "surface" in config.which and surface is not None:
        results["surface"] = surface_metrics(surface.alphas, surface.betas, surface.loss, surface.accuracy,
                                             config.radius, config.tau)
    extra = {}
    if input_surface is not None and "surface" in config.which:
        input_metrics = surface_metrics(input_surface.alphas, input_surface.betas, input_surface.loss,
                                        input_surface.accuracy, config.radius, config.tau)
        extra.update(input_surface_values(input_metrics))
    if "surface" in config.which:
        extra.update(surface_topology(surface, config.basin_tau, ""))
        extra.update(surface_topology(input_surface, config.basin_tau, "input_"))
    if "calibration" in config.which:
        extra.update(center_calibration(model, params, split.head(config.calibration_examples)))
    if set(config.which) - {"surface", "calibration"}:
        results.update(_model_metrics(model, params, split, config))
    return metrics_row(checkpoint, method, seed, test_accuracy, settings=settings, test_metrics=test_metrics,
                       prompt_type=model.prompt_type, **results, **extra)


def metric_settings(config: MetricsConfig, surface: Surface | None = None) -> dict:
    """row["settings"]: one key per setting, named for what it is (metric_examples: the model-based metrics';
    surface_examples: the surface's; surface_radius/surface_tau: the disc metrics')."""
    settings = {**asdict(config), "dtype": "float32"}
    renamed = {"examples": "metric_examples", "radius": "surface_radius", "tau": "surface_tau"}
    settings = {renamed.get(k, k): v for k, v in settings.items()}
    if surface is not None and surface.spec.get("examples") is not None:
        settings["surface_examples"] = surface.spec["examples"]
    return settings


def input_surface_values(metrics: SurfaceMetrics) -> dict:
    """The input-space surface's row keys: input_grid_sharpness, input_curvature_eigenvalues and their reasons."""
    values = metrics.to_dict()
    return {f"input_{k}": values[k] for k in ("grid_sharpness", "grid_sharpness_reason", "curvature_eigenvalues",
                                             "curvature_eigenvalues_reason") if k in values}


def surface_topology(surface: Surface | None, tau: float, prefix: str) -> dict:
    """persistence (birth, death pairs; the global minimum's death inf) and basins of a complete 2D surface."""
    if surface is None or min(surface.shape) < 2 or not surface.is_complete:
        return {}
    topology = loss_topology(surface.loss, tau)
    return {f"{prefix}persistence": topology.persistence, f"{prefix}basins": topology.basins}


def center_ece(model: PromptModel, params: dict[str, Tensor], subset: Split, bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017; 15 equal-width bins) of the trained prompt on `subset`: of its
    class probabilities, or with --head lm on a classification task of its rank classification's."""
    return expected_calibration_error(class_probabilities(model, params, subset), subset.labels, bins)


def center_calibration(model: PromptModel, params: dict[str, Tensor], subset: Split, bins: int = 15) -> dict:
    """{"center_ece": ...}; a generation task's is None with `center_ece_reason`: it has no classes."""
    if model.head == "lm" and not model.label_words:
        return {"center_ece": None, "center_ece_reason": "a generation task (--head lm, target texts) has no classes "
                                                         "whose confidence could be calibrated"}
    return {"center_ece": center_ece(model, params, subset, bins)}


@torch.inference_mode()
def class_probabilities(model: PromptModel, params: dict[str, Tensor], subset: Split, batch_size: int = 64
                        ) -> np.ndarray:
    """(N, C) float64: softmax of the class logits, or with --head lm of each label target's summed log-likelihood
    (rank classification: the probability of label c among the C targets the LM could write)."""
    if model.head != "lm":
        return torch.softmax(model.predict(subset.texts, params, batch_size), dim=-1).double().numpy()
    parts = [lm.rank_scores(model, params, model.encode(subset.texts[i:i + batch_size],
                                                        subset.labels[i:i + batch_size], rank=True)).double()
             for i in range(0, len(subset), batch_size)]  # (B, C) each
    return torch.softmax(torch.cat(parts), dim=-1).cpu().numpy()


def _model_metrics(model: PromptModel, params: dict[str, Tensor], split: Split, config: MetricsConfig) -> dict:
    subset = split.head(config.examples)
    batch = model.encode(subset.texts, subset.labels)
    names = list(params) if config.param_scope == "all" else ["prompt"]
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
    if model.prefix_shape is not None and {"hessian", "trace"} & set(config.which):  # a deep prompt: per layer
        out["layer_curvature"] = layer_curvature(loss_fn, trainable, model.prefix_shape.layers,
                                                 "trace" in config.which, config.eigen_tol, config.seed,
                                                 config.max_hvps, config.trace_hvps)
    if "sharpness" in config.which:
        out["worst_case"] = sharpness.worst_case_sharpness(loss_fn, trainable, config.rho_of_norm * float(flat.norm()),
                                                         config.ascent_steps, seed=config.seed)
        out["adaptive_worst_case"] = sharpness.worst_case_sharpness(
            loss_fn, trainable, config.rho_of_norm * flat.numel() ** 0.5, config.ascent_steps, adaptive=True,
            seed=config.seed)
        rms = float(flat.pow(2).mean().sqrt())
        out["average"] = sharpness.average_sharpness(loss_fn, trainable, config.sigma_of_rms * rms, config.samples, config.seed)
    if "input" in config.which:
        loss_input, embeddings, mask = sharpness.input_space_closure(model, params, batch)
        out["input_worst_case"] = sharpness.input_worst_case_sharpness(loss_input, embeddings, mask, config.input_eps_of_norm,
                                                                     config.ascent_steps, seed=config.seed)
        out["input_average"] = sharpness.input_average_sharpness(loss_input, embeddings, mask, config.sigma_of_rms,
                                                               config.samples, config.seed)
    if "spectrum" in config.which:
        out["spectrum"] = hessian_spectrum(loss_fn, trainable, config.spectrum_probes, config.spectrum_steps,
                                           config.seed)
        out["min_eigen"] = hessian_min_eigenvalue(loss_fn, trainable, config.eigen_tol, config.seed, config.max_hvps)
    return out


def metrics_row(
    checkpoint: str, method: str, seed: int, test_accuracy: float | None = None,
    surface: SurfaceMetrics | None = None, eigen=None, trace=None, worst_case=None, adaptive_worst_case=None,
    average=None,
    input_worst_case=None, input_average=None, spectrum=None, min_eigen=None, layer_curvature=None,
    settings: dict | None = None,
    test_metrics: dict[str, float] | None = None, **extra,
) -> dict:
    """One metrics.json row under DESIGN.md's key names.

    eigen, trace, worst_case, ... are the result dataclasses of landscape.hessian (EigenResult,
    TraceResult, WorstCaseResult, AverageResult). Estimator costs go to row["cost"] and the
    caller's settings (rho, sigma, eps, ...) plus the surface's radius/tau to row["settings"],
    so that the statistics (landscape.stats) treat neither as metrics.
    """
    row: dict = {"checkpoint": checkpoint, "method": method, "seed": seed, "test_accuracy": test_accuracy,
                 **(test_metrics or {})}  # the task's metric (test_f1, test_mcc, ...): a target like test accuracy
    cost: dict = {}
    settings = dict(settings or {})
    if surface is not None:
        values = surface.to_dict()
        settings.update(surface_radius=values.pop("radius"), surface_tau=values.pop("tau"))
        cost["surface_points"] = values.pop("points_used")  # the disc metrics' support
        cost["surface_fit_residual_dof"] = surface.fit_residual_dof  # the quadratic fit's
        row.update(values)
    if eigen is not None:
        row.update(hessian_eigenvalues=eigen.eigenvalues, hessian_eigenvalue_residuals=eigen.residuals,
                   hessian_eigen_converged=eigen.converged)
        cost["hessian_eigen_hvps"] = eigen.hvps
    if trace is not None:
        row.update(hessian_trace=trace.trace, hessian_trace_stderr=trace.stderr)
        cost["hessian_trace_hvps"] = trace.hvps
    if layer_curvature is not None:  # a deep prompt's per-layer top eigenvalue and trace: lists of L values
        cost["layer_hessian_hvps"] = layer_curvature["layer_hessian_hvps"]
        row.update({k: v for k, v in layer_curvature.items() if k != "layer_hessian_hvps"})
    if spectrum is not None:  # landscape.spectrum.SpectrumResult: the density's quadrature, not a column
        row.update(hessian_spectrum_nodes=spectrum.nodes, hessian_spectrum_weights=spectrum.weights)
        cost["hessian_spectrum_hvps"] = spectrum.hvps
    if min_eigen is not None:  # landscape.spectrum.MinEigenResult: < 0 (beyond its residual) is a saddle
        row.update(hessian_min_eigenvalue=min_eigen.eigenvalue,
                   hessian_min_eigenvalue_residual=min_eigen.residual_norm)
        cost["hessian_min_eigen_hvps"] = min_eigen.hvps
    for prefix, result in (("", worst_case), ("adaptive_", adaptive_worst_case), ("input_", input_worst_case)):
        if result is not None:
            row[f"{prefix}worst_case_sharpness"] = result.sharpness
            cost[f"{prefix}worst_case_forwards"] = result.forwards
    for prefix, result in (("", average), ("input_", input_average)):
        if result is not None:
            row.update({f"{prefix}average_sharpness": result.sharpness,
                        f"{prefix}average_sharpness_ci": [result.ci_low, result.ci_high]})
            cost[f"{prefix}average_sharpness_forwards"] = result.forwards
    row.update(extra, cost=cost, settings=settings)
    return row
