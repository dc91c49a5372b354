"""Reading a cardline /metrics endpoint in tests: every sample by name and labels."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


class Samples:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of NAME's samples whose labels include LABELS (0 if there is none)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


def scrape(address: str) -> Samples:
    """GET http://ADDRESS/metrics (blocking: call it from a thread when the server's loop is yours)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return Samples(response.read().decode())
