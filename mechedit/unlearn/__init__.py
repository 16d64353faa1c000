"""Loss-based unlearning (GA, GD, NPO, DPO, RT, RMU) on one shared training loop.

Each method is a module `m_<name>.py` registering itself with `register_method(..., kind="unlearn")`;
`mechedit.edit.api.get_method` imports them. Forget targets are parsed by `targets.parse_forget`.
"""
from mechedit.unlearn.targets import ForgetTarget, parse_forget

__all__ = ["ForgetTarget", "parse_forget"]
