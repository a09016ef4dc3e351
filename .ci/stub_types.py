"""The types of ``twinflow._core``'s public members, for the generated ``_core.pyi``.

pyo3 records a text signature without types (and none at all for properties), so the types
live here, next to the generator, one entry per member. ``stubgen.py`` refuses a stale table:
a member without an entry, an entry for a member that is gone, or parameter names that differ
from the binding's text signature. Types follow the Rust signatures in ``src/python/*.rs``.
"""

# Names the stub header defines for these annotations.
ALIASES = {
    "SettingValue": "Union[bool, int, float, str, Tuple[float, ...], None]",
    "LossSettingValue": "Union[bool, int, float, str, Tuple[float, ...], Dict[str, float], None]",
    "Span": "Tuple[int, int]",
}

# Module constants.
CONSTANTS = {
    "LOSS_SETTINGS": "Tuple[Dict[str, Any], ...]",
    "GAMMA_MAX_ROUNDS": "int",
    "MAX_SAMPLING_STEPS": "int",
    "RUN_NAMES": "Tuple[str, str, str, str]",
    "SAMPLER_SETTINGS": "List[Dict[str, Any]]",
    "STAT_NAMES": "Tuple[str, ...]",
    "__version__": "str",
}

# Functions and methods: the signature with types (the receiver included); properties: their
# type, and "; settable" when they also take assignments.
MEMBERS = {
    "barron_loss": "(pred: Tensor, target: Tensor, alpha: float = 1.0, c: float = 0.001) -> Tensor",
    "l2_loss": "(pred: Tensor, target: Tensor) -> Tensor",
    "set_cpu_pool": "(name: str) -> str",
    "split_sub_batches": "(batch_size: int, weights: Mapping[str, float]) -> Dict[str, Span]",
    "time_weight": "(t: Tensor, tt: Tensor) -> Tensor",
    "ucgm_step": ("(x: Tensor, velocity: Tensor, t_cur: float, t_next: float, stochast_ratio: Optional[float] = None, "
                  "noise: Optional[Tensor] = None, out: Optional[Tensor] = None, check_finite: bool = True) -> Tensor"),

    "EmaSchedule.__init__": "(self, rate: float) -> None",
    "EmaSchedule.decay": "float",
    "EmaSchedule.load_state": "(self, decay: float, updates: int) -> None",
    "EmaSchedule.rate": "float",
    "EmaSchedule.update": "(self, ema_params: Sequence[Tensor], params: Sequence[Tensor]) -> float",
    "EmaSchedule.updates": "int",

    "Evaluation.corrector": "bool",
    "Evaluation.interval": "int",
    "Evaluation.noise": "bool",
    "Evaluation.t": "float",
    "Evaluation.tt": "float",

    "Plan.beta_ratio": "(self, x: Tensor, y: Tensor) -> Tensor",
    "Plan.compute_dtype": "torch.dtype",
    "Plan.dist_matching": "bool",
    "Plan.dist_matching_input": "(self, x_t: Tensor, f: Tensor, t: Tensor, tau: Tensor, noise: Tensor) -> Tensor",
    "Plan.dist_matching_term": "(self, f: Tensor, v_fake: Tensor, v_real: Tensor) -> Tensor",
    "Plan.enhance": "(self, target: Tensor, t: Tensor, v_c: Tensor, v_u: Tensor) -> None",
    "Plan.enhance_rows": "(self, has_uncond: bool) -> Optional[Span]",
    "Plan.fake_rows": "Optional[Span]",
    "Plan.finish": "(self, base: Tensor, dm: Optional[Tensor], lw: Tensor) -> Tuple[Tensor, Tensor]",
    "Plan.gamma_boost": "(self, g: Tensor, u: Tensor, a: float) -> Tensor",
    "Plan.gamma_round": "(self, out: Tensor, pending: Tensor, x: Tensor, u: Tensor, a: float) -> Tensor",
    "Plan.gamma_start": "(self, n: int) -> Tuple[Tensor, Tensor]",
    "Plan.noisy_inputs": "(self, data: Tensor, z: Tensor, t: Tensor, tt: Tensor) -> Tuple[Tensor, Tensor]",
    "Plan.rcgm": "(self, x_t: Tensor, target: Tensor, f: Tensor, t: Tensor, tt: Tensor) -> Optional[Tuple[Rcgm, bool]]",
    "Plan.rcgm_rows": "Span",
    "Plan.rows": "int",
    "Plan.runs": "Tuple[Span, Span, Span, Span]",
    "Plan.set_rcgm_target": "(self, target: Tensor, walk: Rcgm) -> None",
    "Plan.time_dist_ctrl": "Tuple[float, float, float]",
    "Plan.times": "(self, raw: Tensor, u: Tensor, u2: Tensor) -> Tuple[Tensor, Tensor]",
    "Plan.weighted_loss": "(self, f: Tensor, target: Tensor, t: Tensor, tt: Tensor) -> Tuple[Tensor, Tensor]",
    "Plan.with_fakes": "(self, x: Tensor, z: Optional[Tensor] = None, f: Optional[Tensor] = None) -> Tensor",

    "Rcgm.give": "(self, velocity: Tensor) -> None",
    "Rcgm.next": "(self) -> Optional[Tuple[Tensor, Tensor, Tensor]]",

    "SamplerSettings.__init__": "(self, **settings: SettingValue) -> None",
    "SamplerSettings.get": "(self, name: str) -> SettingValue",
    "SamplerSettings.nfe": "int",
    "SamplerSettings.preset": "(name: str, **overrides: SettingValue) -> SamplerSettings",
    "SamplerSettings.replace": "(self, **overrides: SettingValue) -> SamplerSettings",
    "SamplerSettings.timesteps": "Tensor",
    "SamplerSettings.to_dict": "(self, all: bool = False) -> Dict[str, SettingValue]",

    "Stepper.__init__": "(self, settings: SamplerSettings, grid: Optional[Sequence[float]] = None) -> None",
    "Stepper.check_noise": "(self, noise: Tensor) -> None",
    "Stepper.evals": "List[Evaluation]",
    "Stepper.grid": "List[float]",
    "Stepper.position": "int; settable",
    "Stepper.step": ("(self, x: Tensor, velocity: Tensor, noise: Optional[Tensor] = None, "
                     "xhat_out: Optional[Tensor] = None) -> Tensor"),

    "TwinFlowObjective.__init__": '(self, recipe: str = "twinflow", **settings: LossSettingValue) -> None',
    "TwinFlowObjective.ema_decay_rate": "float",
    "TwinFlowObjective.needs_teacher": "bool",
    "TwinFlowObjective.plan": ("(self, x: Tensor, cond: Optional[Sequence[Tensor]] = None, "
                               "uncond: Optional[Sequence[Tensor]] = None) -> Plan"),
    "TwinFlowObjective.to_dict": "(self) -> Dict[str, LossSettingValue]",
}
