"""Locust users for an OpenAI-compatible server: streaming chat, chat, completions, embeddings.

Run it through the runner (`python -m loadtests.run`, `fnserve loadtest`), or by hand:
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000
Configuration, from the environment:
    FNSERVE_LT_MODEL / FNSERVE_LT_EMBEDDING_MODEL   model names sent (default "default")
    FNSERVE_LT_MAX_TOKENS                           output tokens per request (default 128)
    FNSERVE_LT_FIXED_LENGTH=1                       send ignore_eos + min_tokens, so every server writes as much
    FNSERVE_LT_WEIGHTS                              e.g. "stream_chat=4,chat=1,completions=1,embeddings=1"
    FNSERVE_LT_THINK                                seconds between a user's requests: "0" or "0.5-2"
    FNSERVE_LT_API_KEY                              sent as a bearer token
    FNSERVE_LT_SCENARIO                             sweep | spike | smoke (the load shape)
    FNSERVE_LT_SAMPLES                              a JSON-lines file that gets one record per request
Every response is validated: a 200 with a malformed body counts as a failure. Streaming chat fires extra
request events for time to first token ("TTFT"), inter-token latency ("ITL"), time per output token ("TPOT"),
all in ms, and "output tokens" (a count per request, shown in Locust's response-time columns).
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from gevent import GreenletExit
from locust import HttpUser, between, constant, events, task
from locust.env import Environment

from loadtests import prompts, shapes

MODEL = os.environ.get("FNSERVE_LT_MODEL", "default")
EMBEDDING_MODEL = os.environ.get("FNSERVE_LT_EMBEDDING_MODEL", "default")
MAX_TOKENS = int(os.environ.get("FNSERVE_LT_MAX_TOKENS", "128"))
FIXED_LENGTH = os.environ.get("FNSERVE_LT_FIXED_LENGTH", "1") == "1"
WEIGHTS = dict(
    (name.strip(), int(weight))
    for name, weight in (
        pair.split("=") for pair in os.environ.get("FNSERVE_LT_WEIGHTS", "stream_chat=1").split(",") if pair
    )
)
THINK = os.environ.get("FNSERVE_LT_THINK", "0")
API_KEY = os.environ.get("FNSERVE_LT_API_KEY")
SAMPLES = os.environ.get("FNSERVE_LT_SAMPLES")
SCENARIO = os.environ.get("FNSERVE_LT_SCENARIO", "smoke")

ActiveShape = {"sweep": shapes.SweepShape, "spike": shapes.SpikeShape, "smoke": shapes.SmokeShape}[SCENARIO]
STEPS = shapes.schedule(SCENARIO)
_started = time.time()


class InvalidResponse(Exception):
    """A response that came back 200 but is not what the API promises."""


@events.test_start.add_listener
def _on_start(environment: Environment, **_: Any) -> None:
    global _started
    _started = time.time()
    if SAMPLES:
        with open(SAMPLES, "a") as f:
            f.write(json.dumps({"event": "start", "time": _started, "steps": [s.__dict__ for s in STEPS]}) + "\n")


def _record(**sample: Any) -> None:
    if SAMPLES:
        with open(SAMPLES, "a") as f:
            f.write(json.dumps(sample) + "\n")


def _step(at: float) -> int:
    elapsed = 0.0
    for index, step in enumerate(STEPS):
        elapsed += step.seconds
        if at - _started < elapsed:
            return index
    return len(STEPS) - 1


def _think() -> Any:
    if "-" in THINK:
        low, high = (float(x) for x in THINK.split("-"))
        return between(low, high)
    return constant(float(THINK))


def _sampling() -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.7,
        "seed": random.randrange(1 << 30),
    }
    if FIXED_LENGTH:
        body |= {"ignore_eos": True, "min_tokens": MAX_TOKENS}
    return body


class OpenAIUser(HttpUser):
    abstract = True
    wait_time = _think()

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def fire(self, name: str, ms: float, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="METRIC", name=name, response_time=ms, response_length=0, exception=exception, context={}
        )

    def done(self, kind: str, started: float, ok: bool, status: int, tokens: int, **extra: Any) -> None:
        _record(
            kind=kind, step=_step(started), start=started, end=time.time(), ok=ok, status=status, tokens=tokens, **extra
        )

    def _post(self, kind: str, path: str, body: dict[str, Any], text: Any) -> None:
        """POST a non-streaming request, validate the answer, record it."""
        started = time.time()
        with self.client.post(path, json=body, catch_response=True, name=kind) as r:
            try:
                if r.status_code != 200:
                    raise InvalidResponse(f"HTTP {r.status_code}: {r.text[:200]}")
                payload = r.json()
                if not isinstance(text(payload), str):
                    raise InvalidResponse("no text in the answer")
                tokens = int(payload["usage"]["completion_tokens"])
                r.success()
                self.done(kind, started, True, r.status_code, tokens)
            except (InvalidResponse, ValueError, KeyError, TypeError, IndexError) as exc:
                r.failure(str(exc))
                self.done(kind, started, False, r.status_code, 0, error=str(exc))


class StreamingChatUser(OpenAIUser):
    weight = WEIGHTS.get("stream_chat", 0)
    abstract = weight == 0  # Locust spawns no abstract class

    @task
    def stream_chat(self) -> None:
        body = _sampling() | {"messages": [{"role": "user", "content": random.choice(prompts.ALL)}], "stream": True}
        started = time.time()
        stamps: list[float] = []
        try:
            status, error = self._stream(body, stamps)
        except GreenletExit:  # the run ended, or the shape took this user away, mid-stream
            # Tokens that already arrived were served inside the run: they count toward the throughput.
            first = stamps[0] if stamps else None
            self.done("stream_chat", started, False, 0, len(stamps), interrupted=True, first=first)
            raise
        if error is None:
            ttft = stamps[0] - started
            gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
            self.fire("TTFT", ttft * 1000)
            for gap in gaps:
                self.fire("ITL", gap * 1000)
            if tpot is not None:
                self.fire("TPOT", tpot * 1000)
            self.fire("output tokens", len(stamps))  # a count, in Locust's response-time column
            self.done(
                "stream_chat", started, True, status, len(stamps), ttft=ttft, tpot=tpot, itl=gaps, first=stamps[0]
            )
        else:
            self.done("stream_chat", started, False, status, 0, error=error)

    def _stream(self, body: dict[str, Any], stamps: list[float]) -> tuple[int, str | None]:
        """Send a streaming chat request and read it to the end, stamping each text chunk: (status, error)."""
        with self.client.post(
            "/v1/chat/completions", json=body, stream=True, catch_response=True, name="chat stream"
        ) as r:
            try:
                if r.status_code != 200:
                    raise InvalidResponse(f"HTTP {r.status_code}: {r.text[:200]}")
                done = finished = False
                for raw in r.iter_lines():  # bytes: split at CR and LF alone, as SSE is (str would split at U+2028)
                    line = raw.decode()
                    if not line or not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise InvalidResponse(f"error frame: {chunk['error']}")
                    for choice in chunk.get("choices") or []:
                        if not isinstance(choice.get("delta"), dict):
                            raise InvalidResponse("a chunk without a delta")
                        if choice["delta"].get("content"):
                            stamps.append(time.time())
                        finished = finished or choice.get("finish_reason") is not None
                if not (done and finished and stamps):
                    raise InvalidResponse("the stream ended without text, finish_reason or [DONE]")
                r.success()
                return r.status_code, None
            except (InvalidResponse, ValueError, KeyError) as exc:
                r.failure(str(exc))
                return r.status_code, str(exc)


class ChatUser(OpenAIUser):
    weight = WEIGHTS.get("chat", 0)
    abstract = weight == 0  # Locust spawns no abstract class

    @task
    def chat(self) -> None:
        body = _sampling() | {"messages": [{"role": "user", "content": random.choice(prompts.ALL)}]}
        self._post("chat", "/v1/chat/completions", body, lambda j: j["choices"][0]["message"]["content"])


class CompletionsUser(OpenAIUser):
    weight = WEIGHTS.get("completions", 0)
    abstract = weight == 0  # Locust spawns no abstract class

    @task
    def completions(self) -> None:
        body = _sampling() | {"prompt": random.choice(prompts.ALL)}
        self._post("completions", "/v1/completions", body, lambda j: j["choices"][0]["text"])


class EmbeddingsUser(OpenAIUser):
    weight = WEIGHTS.get("embeddings", 0)
    abstract = weight == 0  # Locust spawns no abstract class

    @task
    def embeddings(self) -> None:
        texts = random.sample(prompts.EMBEDDING_TEXTS, 4)
        started = time.time()
        with self.client.post(
            "/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": texts}, catch_response=True, name="embeddings"
        ) as r:
            try:
                data = r.json()["data"] if r.status_code == 200 else None
                if data is None:
                    raise InvalidResponse(f"HTTP {r.status_code}: {r.text[:200]}")
                sizes = {len(d["embedding"]) for d in data}
                if len(data) != len(texts) or len(sizes) != 1 or 0 in sizes:
                    raise InvalidResponse("wrong number or shape of vectors")
                r.success()
                self.done("embeddings", started, True, r.status_code, 0)
            except (InvalidResponse, ValueError, KeyError, TypeError) as exc:
                r.failure(str(exc))
                self.done("embeddings", started, False, r.status_code, 0, error=str(exc))
