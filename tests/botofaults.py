"""Deterministic fault injection at botocore's HTTP boundary (works with moto and real servers).

A handler on ``before-send`` may return a synthetic HTTP response instead of sending the
request, so botocore parses a real S3 error document: the client under test sees exactly what
a throttling or failing server would produce.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

from botocore.awsrequest import AWSResponse

ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
             '<Message>{message}</Message><RequestId>fault</RequestId></Error>')


class _Raw:
    def __init__(self, data: bytes):
        self._data = data
        self._done = False

    def stream(self, *args, **kwargs):
        if not self._done:
            self._done = True
            yield self._data

    def read(self, *args, **kwargs):
        if self._done:
            return b""
        self._done = True
        return self._data


def error_response(url: str, status: int, code: str, message: str = "injected") -> AWSResponse:
    body = ERROR_XML.format(code=code, message=message).encode()
    return AWSResponse(url, status, {"Content-Type": "application/xml", "Content-Length": str(len(body))}, _Raw(body))


@dataclass
class FaultPlan:
    """Inject ``status``/``code`` into the next ``count`` requests of ``operation`` (None = any)."""

    status: int
    code: str
    count: int
    operation: str | None = None
    injected: int = 0


@dataclass
class BotoFaults:
    plans: list[FaultPlan] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def attach(self, boto_client) -> "BotoFaults":
        boto_client.meta.events.register("before-send.s3", self._before_send)
        return self

    def add(self, status: int, code: str, count: int, operation: str | None = None) -> FaultPlan:
        plan = FaultPlan(status, code, count, operation)
        with self.lock:
            self.plans.append(plan)
        return plan

    def _before_send(self, request, **kwargs):
        op = kwargs.get("event_name", "").rsplit(".", 1)[-1] or None
        with self.lock:
            self.seen.append(op or "?")
            for plan in self.plans:
                if plan.injected < plan.count and (plan.operation is None or plan.operation == op):
                    plan.injected += 1
                    return error_response(request.url, plan.status, plan.code)
        return None

    @property
    def injected(self) -> int:
        with self.lock:
            return sum(p.injected for p in self.plans)
