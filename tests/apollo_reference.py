"""The reference APOLLO (apollo-torch 1.0.3) as a test oracle, loaded without the package's __init__.

``apollo_torch/__init__.py`` imports its 8-bit variants and so bitsandbytes; the optimizer itself only
needs ``apollo.py`` and its projector modules, which are loaded here from the installed files. Importing
this module raises ModuleNotFoundError when apollo-torch (or transformers, which apollo.py imports) is
missing, so ``pytest.importorskip("apollo_reference")`` skips the oracle tests there.
"""

import importlib.util
import sys
import types

_spec = importlib.util.find_spec("apollo_torch")  # finds the package without running its __init__
if _spec is None or not _spec.submodule_search_locations:
    raise ModuleNotFoundError("apollo_torch is not installed (pip install --no-deps apollo-torch==1.0.3)")

_PACKAGE = "_apollo_torch_reference"
if _PACKAGE not in sys.modules:
    package = types.ModuleType(_PACKAGE)
    package.__path__ = list(_spec.submodule_search_locations)
    sys.modules[_PACKAGE] = package
apollo = importlib.import_module(f"{_PACKAGE}.apollo")
random_projector = importlib.import_module(f"{_PACKAGE}.random_projector")


def reference_apollo(param_groups, *, projector, seed, limiter=True, **kw):
    """``apollo.AdamW`` whose projections come from our ``projector(seed, index, refresh, rank, dim)``.

    The reference numbers parameters from 1 across groups (its ``state["seed"]``); ours from 0. Its P is
    Q.T (rank x n) for a "right" projection (m >= n) and Q (m x rank) for a "left" one (m < n).
    """
    base_seed = seed

    class SameP(random_projector.GradientProjector):
        def __init__(self, rank, update_proj_gap, scale, proj_type, seed):
            super().__init__(rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                             seed=seed)
            self.index, self.refreshes = seed - 1, 0

        def get_orthogonal_matrix(self, weights, rank, type, seed):
            q = projector(base_seed, self.index, self.refreshes, rank, min(weights.shape))
            self.refreshes += 1
            q = q.to(weights.device, weights.dtype)
            return q.T.contiguous() if type == "right" else q

    class Reference(apollo.AdamW):
        def _initialize_projector(self, group, state):
            return SameP(group["rank"], group["update_proj_gap"], group["scale"], group["proj_type"],
                         state["seed"])

    groups = [{"proj": "random", "proj_type": "std", **g} if "rank" in g else g for g in param_groups]
    return Reference(groups, disable_nl=not limiter, **kw)
