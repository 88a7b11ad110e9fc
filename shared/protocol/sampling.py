"""Where a request's sampling fields become SamplingParams: the one place their values are checked."""

from __future__ import annotations

from typing import Any

from shared.errors import InvalidRequestError
from shared.generation.params import SamplingParams
from shared.settings import Settings

MAX_TOP_LOGPROBS = 20


def build_sampling_params(
    request: Any, limits: Settings, max_tokens: int | None, *, logprobs: bool, top: int
) -> SamplingParams:
    """SamplingParams from the fields chat and completions share (None means the default), checked against
    OpenAI's ranges and this server's request limits; a bad value is a 400 that names its field."""

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    n = int(pick(request.n, 1))
    _check(1 <= n <= limits.max_n, "n", f"must be between 1 and {limits.max_n} (max_n)")
    stop = request.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    _check(
        len(stops) <= limits.max_stop, "stop", f"holds {len(stops)} strings; the limit is {limits.max_stop} (max_stop)"
    )
    _check(all(stops), "stop", "must not contain empty strings")
    raw_bias = request.logit_bias or {}
    _check(
        len(raw_bias) <= limits.max_logit_bias,
        "logit_bias",
        f"holds {len(raw_bias)} entries; the limit is {limits.max_logit_bias} (max_logit_bias)",
    )
    try:
        bias = {int(k): float(v) for k, v in raw_bias.items()}
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from None
    _check(all(k >= 0 for k in bias), "logit_bias", "keys must be token ids, 0 or more")
    _check(all(-100.0 <= b <= 100.0 for b in bias.values()), "logit_bias", "values must be between -100 and 100")
    seed = request.seed
    _check(seed is None or -(2**63) <= seed < 2**64, "seed", "must be a 64-bit integer, signed or not")
    if max_tokens is not None:
        _check(max_tokens >= 1, "max_tokens", "must be at least 1")
        cap = limits.max_completion_tokens
        _check(cap is None or max_tokens <= cap, "max_tokens", f"must be at most {cap} (max_completion_tokens)")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(pick(request.temperature, 1.0)),
        top_p=float(pick(request.top_p, 1.0)),
        top_k=int(pick(request.top_k, 0)),
        min_p=float(pick(request.min_p, 0.0)),
        repetition_penalty=float(pick(request.repetition_penalty, 1.0)),
        presence_penalty=float(pick(request.presence_penalty, 0.0)),
        frequency_penalty=float(pick(request.frequency_penalty, 0.0)),
        seed=seed,
        logit_bias=bias,
        stop=stops,
        ignore_eos=bool(request.ignore_eos),
        min_tokens=int(pick(request.min_tokens, 0)),
        logprobs=logprobs,
        top_logprobs=top,
    )
    _check(0.0 <= params.temperature <= 2.0, "temperature", "must be between 0 and 2")
    _check(0.0 < params.top_p <= 1.0, "top_p", "must be greater than 0 and at most 1")
    _check(params.top_k >= 0, "top_k", "must be 0 (off) or positive")
    _check(0.0 <= params.min_p <= 1.0, "min_p", "must be between 0 and 1")
    _check(0.0 < params.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]")
    _check(-2.0 <= params.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2")
    _check(-2.0 <= params.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2")
    _check(params.min_tokens >= 0, "min_tokens", "must not be negative")
    _check(max_tokens is None or params.min_tokens <= max_tokens, "min_tokens", "must not exceed max_tokens")
    _check(0 <= top <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be 0-{MAX_TOP_LOGPROBS}")
    return params


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{param} {message}", param=param)
