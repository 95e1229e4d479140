"""What a serving engine tells the monitor about the model it runs (engine-neutral)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..adapters.base import GateSpec


class Engine:
    """One serving engine's view of a model: its gates, its real tokens, its name.

    Subclasses (``moewatch.engines.vllm.VllmEngine``) implement :meth:`gates` and
    :meth:`real_tokens`; the monitor calls them at attach and on every root forward.
    """

    name = "engine"

    def gates(self, model: nn.Module, options) -> List[GateSpec]:
        """Every MoE gate of ``model``, each with the seam that hands the hook the engine's
        own routing decision (``GateSpec.install``). Raises ``AdapterError`` when none fits."""
        raise NotImplementedError

    def real_tokens(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """At each root forward: a [1, T] mask of the forward's token rows (nonzero = a real
        token, zero = padding or a warm-up run), or None when every row is real. Runs at run
        time, outside compiled code."""
        return None

    def requests(self):
        """At each root forward, after :meth:`real_tokens`: the requests its real tokens belong
        to (``moewatch.hotpath.requests.RequestTokens``), or None where the engine does not say.
        Runs at run time, outside compiled code."""
        return None

    # While a step that the engine marks itself runs (see drive_steps): the thread running it
    # (``threading.get_ident()``), on which the root module's hooks then do nothing; None between
    # steps. Another thread's forward meanwhile is marked by the hooks, as any forward.
    stepping_thread: Optional[int] = None

    def drive_steps(self, banks) -> Optional[object]:
        """Where the engine can mark each of its steps' forwards itself, around the whole step,
        with no padding row in them: take ``banks`` (a monitor's hot path,
        ``moewatch.hotpath.banks.Banks``), begin and end a forward on them at every armed step
        (``Banks.begin_step`` / ``end_step``) with ``stepping_thread`` set meanwhile, and return a
        handle whose ``remove()`` gives them back. None (the default): the root module's hooks
        mark every forward."""
        return None

    def row_locator(self) -> Optional[Callable[[int, int], Optional[int]]]:
        """Where the engine routes the tokens of every data-parallel rank together (a gate
        call's decisions cover ``gathered`` rows, its logits this rank's ``local`` rows): a
        function ``(local, gathered) -> `` the first of this rank's rows among the gathered ones
        (None where it cannot say), called by the hot path at run time for such calls only
        (``moewatch.hotpath.gathered``). None (the default): the engine never gathers them."""
        return None

    def model_name(self, model: nn.Module) -> Optional[str]:
        """The ``model`` label the engine serves the model under, or None."""
        return None

    def holds_part_of_model(self) -> bool:
        """Whether this process runs only some of the model's MoE layers (a pipeline stage): a
        baseline of the whole model is then used for the layers this stage holds."""
        return False

    def parallel_ranks(self) -> Dict[str, int]:
        """This process's rank in each parallel group the engine runs it in, by group: ``tp``
        (tensor), ``pp`` (pipeline), ``dp`` (data), ``ep`` (expert parallel); only the groups
        the engine has. Read once, at attach; exported as ``moewatch_parallel_rank_info``."""
        return {}
