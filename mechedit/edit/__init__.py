"""Knowledge editing: requests, results, the method registry and the built-in editors (modules m_*)."""
from mechedit.edit.api import (METHODS, EditRequest, EditResult, get_method, make_params, register_method,
                               run_method)

edit = run_method

__all__ = ["EditRequest", "EditResult", "register_method", "get_method", "make_params", "run_method", "edit",
           "METHODS"]
