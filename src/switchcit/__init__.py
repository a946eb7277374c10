"""switchcit: continual instruction tuning with one LoRA expert per task and a learned switch (SwitchCIT)."""

from .continual import BASE, Completion, ContinualModel, Generation, Route
from .data import Example, Task, load_examples
from .errors import SwitchcitError
from .experts import ExpertConfig
from .memory import MemoryConfig
from .store import Store
from .switch import SwitchConfig

__all__ = ["BASE", "Completion", "ContinualModel", "Example", "ExpertConfig", "Generation", "MemoryConfig", "Route",
           "Store", "SwitchConfig", "SwitchcitError", "Task", "load_examples"]
__version__ = "0.1.0"
