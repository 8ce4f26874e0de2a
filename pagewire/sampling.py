"""Sampling parameters: defaults, bounds and validation, in one place.

The router validates every request with :func:`validate`; the scheduler and the worker trust what
reaches them and read the resolved values from :class:`SamplingParams`. Each error names the field
and its limit, because a client in another language only sees the message.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagewire import structured as so
from pagewire.structured import StructuredOutput
from pagewire.v1 import common_pb2

DEFAULT_MAX_TOKENS = 16
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_K = 1 << 20
MAX_SEED = (1 << 63) - 1
MAX_TEMPERATURE = 1e4
MAX_PENALTY = 2.0  # presence and frequency, as OpenAI bounds them
# CTRL's penalty divides positive logits; past ~100 every seen token is effectively banned, so a
# larger value is more likely a unit mistake than intent.
MAX_REPETITION_PENALTY = 100.0
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on each logit_bias value
# Entries per request: the worker scatters them into the logits each step, so bound the work.
MAX_LOGIT_BIAS_ENTRIES = 1024


class ValidationError(ValueError):
    """A request field is out of bounds. ``field`` is the API name of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


@dataclass(frozen=True)
class SamplingParams:
    """Resolved sampling parameters (every default applied)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; 0: the sampled token's only; k: plus top k
    prompt_logprobs: int | None = None
    n: int = 1
    include_stop_str_in_output: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id
    best_of: int | None = None  # None: n (no selection)
    structured: StructuredOutput | None = None  # None: unconstrained

    @property
    def penalized(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_proto(cls, msg: common_pb2.SamplingParams) -> SamplingParams:
        """Apply the documented defaults to a (possibly partial) message. Does not validate."""
        return cls(
            temperature=msg.temperature if msg.HasField("temperature") else 1.0,
            top_p=msg.top_p if msg.HasField("top_p") else 1.0,
            top_k=max(msg.top_k, 0) if msg.HasField("top_k") else 0,
            max_tokens=msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
            stop=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            seed=msg.seed if msg.HasField("seed") else None,
            skip_special_tokens=(
                msg.skip_special_tokens if msg.HasField("skip_special_tokens") else True
            ),
            min_p=msg.min_p if msg.HasField("min_p") else 0.0,
            presence_penalty=msg.presence_penalty if msg.HasField("presence_penalty") else 0.0,
            frequency_penalty=msg.frequency_penalty if msg.HasField("frequency_penalty") else 0.0,
            repetition_penalty=(
                msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0
            ),
            min_tokens=msg.min_tokens if msg.HasField("min_tokens") else 0,
            logprobs=msg.logprobs if msg.HasField("logprobs") else None,
            prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
            n=msg.n if msg.HasField("n") else 1,
            include_stop_str_in_output=msg.include_stop_str_in_output,
            logit_bias=tuple(sorted(msg.logit_bias.items())),
            best_of=msg.best_of if msg.HasField("best_of") else None,
            structured=(
                StructuredOutput.from_proto(msg.structured) if msg.HasField("structured") else None
            ),
        )

    def to_proto(self) -> common_pb2.SamplingParams:
        msg = common_pb2.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            n=self.n,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=dict(self.logit_bias),
        )
        if self.best_of is not None:
            msg.best_of = self.best_of
        if self.seed is not None:
            msg.seed = self.seed
        if self.logprobs is not None:
            msg.logprobs = self.logprobs
        if self.prompt_logprobs is not None:
            msg.prompt_logprobs = self.prompt_logprobs
        if self.structured is not None:
            msg.structured.CopyFrom(self.structured.to_proto())
        return msg


@dataclass(frozen=True)
class Limits:
    """Per-deployment bounds on what one request may ask for (the router's --max-n and friends)."""

    max_n: int = 16
    max_logprobs: int = 20
    max_stop_strings: int = MAX_STOP_STRINGS


def validate(
    msg: common_pb2.SamplingParams,
    *,
    prompt_len: int,
    max_model_len: int,
    vocab_size: int,
    limits: Limits = Limits(),
) -> SamplingParams:
    """Check every field against its bounds and return the resolved parameters.

    Raises ValidationError naming the first offending field and its limit. Float bounds are written
    as ``not lo <= x <= hi`` so that NaN, which compares false with everything, is rejected too.
    """
    if msg.HasField("temperature") and not (0.0 <= msg.temperature <= MAX_TEMPERATURE):
        raise ValidationError(
            "temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {msg.temperature}"
        )
    if msg.HasField("top_p") and not (0.0 < msg.top_p <= 1.0):
        raise ValidationError("top_p", f"must be in (0, 1], got {msg.top_p}")
    if msg.HasField("top_k") and not (msg.top_k in (-1, 0) or 1 <= msg.top_k <= MAX_TOP_K):
        raise ValidationError(
            "top_k", f"must be -1, 0 (off) or in [1, {MAX_TOP_K}], got {msg.top_k}"
        )
    _check_closed(msg, "min_p", 0.0, 1.0)
    _check_closed(msg, "presence_penalty", -MAX_PENALTY, MAX_PENALTY)
    _check_closed(msg, "frequency_penalty", -MAX_PENALTY, MAX_PENALTY)
    if msg.HasField("repetition_penalty") and not (
        0.0 < msg.repetition_penalty <= MAX_REPETITION_PENALTY
    ):
        raise ValidationError(
            "repetition_penalty",
            f"must be in (0, {MAX_REPETITION_PENALTY:g}], got {msg.repetition_penalty}",
        )
    if msg.HasField("max_tokens") and msg.max_tokens < 1:
        raise ValidationError("max_tokens", f"must be >= 1 (0 only with echo), got {msg.max_tokens}")
    if prompt_len < 1:
        raise ValidationError("prompt", "must not be empty")
    if prompt_len >= max_model_len:
        raise ValidationError(
            "prompt",
            f"is {prompt_len} tokens; the model's context is {max_model_len} tokens "
            "(prompt must leave room for at least 1 generated token)",
        )
    params = SamplingParams.from_proto(msg)
    if prompt_len + params.max_tokens > max_model_len:
        raise ValidationError(
            "max_tokens",
            f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) must be <= the "
            f"model's context of {max_model_len} tokens",
        )
    _check_closed(msg, "min_tokens", 0, params.max_tokens, " (max_tokens)")
    _check_closed(msg, "logprobs", 0, limits.max_logprobs, " (--max-logprobs)")
    _check_closed(msg, "prompt_logprobs", 0, limits.max_logprobs, " (--max-logprobs)")
    _check_closed(msg, "n", 1, limits.max_n, " (--max-n)")
    if len(msg.stop) > limits.max_stop_strings:
        raise ValidationError(
            "stop",
            f"at most {limits.max_stop_strings} stop strings (--max-stop-strings), "
            f"got {len(msg.stop)}",
        )
    for s in msg.stop:
        if not s or len(s) > MAX_STOP_STRING_CHARS:
            raise ValidationError(
                "stop", f"each stop string must be 1 to {MAX_STOP_STRING_CHARS} characters"
            )
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValidationError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
    for t in msg.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise ValidationError(
                "stop_token_ids", f"each id must be in [0, {vocab_size}), got {t}"
            )
    if msg.HasField("seed") and msg.seed > MAX_SEED:
        raise ValidationError("seed", f"must be <= {MAX_SEED}")
    _check_logit_bias(msg, vocab_size)
    _check_closed(msg, "best_of", params.n, limits.max_n, " (n and --max-n)")
    if params.structured is not None:
        _check_structured(params)
    return params


def _check_structured(params: SamplingParams) -> None:
    assert params.structured is not None
    try:
        so.check(params.structured)
    except so.SpecError as e:
        raise ValidationError("structured", str(e)) from None
    # The constraint decides where the output may end (EOS is allowed only where it is complete):
    # these would leave a position where no token at all may be drawn.
    if params.ignore_eos:
        raise ValidationError("ignore_eos", "cannot be combined with a structured-output constraint")
    if params.min_tokens:
        raise ValidationError("min_tokens", "cannot be combined with a structured-output constraint")


def _check_logit_bias(msg: common_pb2.SamplingParams, vocab_size: int) -> None:
    if len(msg.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValidationError(
            "logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(msg.logit_bias)}"
        )
    for token, bias in msg.logit_bias.items():
        if not 0 <= token < vocab_size:
            raise ValidationError(
                "logit_bias", f"each token id must be in [0, {vocab_size}), got {token}"
            )
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # NaN fails too
            raise ValidationError(
                "logit_bias",
                f"each bias must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                f"got {bias} for token {token}",
            )


def _check_closed(
    msg: common_pb2.SamplingParams, field: str, lo: float, hi: float, hint: str = ""
) -> None:
    """An optional field, when set, must lie in [lo, hi]; ``hint`` names where ``hi`` comes from."""
    if msg.HasField(field):
        value = getattr(msg, field)
        if not lo <= value <= hi:
            raise ValidationError(field, f"must be in [{lo:g}, {hi:g}]{hint}, got {value}")
