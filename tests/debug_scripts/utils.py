"""Loading the scripts of my_debug_scripts/ (a folder of scripts, not a
package) in the tests."""
import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "my_debug_scripts"


def load_script(name: str) -> ModuleType:
    """Import my_debug_scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"debug_script_{name}",
                                                  SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
