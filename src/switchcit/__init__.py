"""switchcit: continual instruction tuning with one LoRA expert per task and a learned switch (SwitchCIT)."""

from .continual import BASE, ContinualModel
from .data import Example, Task, load_examples
from .errors import SwitchcitError
from .experts import ExpertConfig
from .generation import Generation, Route
from .memory import MemoryConfig
from .store import Store
from .switch import SwitchConfig

__all__ = ["BASE", "ContinualModel", "Example", "ExpertConfig", "Generation", "MemoryConfig", "Route",
           "Store", "SwitchConfig", "SwitchcitError", "Task", "load_examples"]
__version__ = "0.1.0"
