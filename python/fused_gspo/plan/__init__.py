"""Planning the chunked LM head: device profiles (:mod:`.devices`), the cost model (:mod:`.cost`), the planner
(:mod:`.planner`), its use at call time (:mod:`.runtime`) and ``explain`` (:mod:`.explain`)."""

from .devices import PROFILES, DeviceProfile, get_profile
from .explain import Plan, explain

__all__ = ["PROFILES", "DeviceProfile", "Plan", "explain", "get_profile"]
