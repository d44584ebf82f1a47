"""``renyi-lora demo``: the method at work on the embedded model, on generated data (``data``) and on real text
(``real_text``: word analogies, ``analogies``). Not part of the library's API: it uses the library like any user."""

from renyi_lora.demo.run import PARTS, run_demo
from renyi_lora.demo.training import DemoArguments

__all__ = ["PARTS", "DemoArguments", "run_demo"]
