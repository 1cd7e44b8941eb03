"""How a training stage's failure comes back from its process into the Prefect task."""

from lib.train.trainer import NonFiniteLossError
from tasks.training import StageFailedError, _rebuilt


def test_the_projects_and_pythons_errors_come_back_with_their_own_type_and_message():
    error = _rebuilt({"type": "lib.train.trainer.NonFiniteLossError", "message": "The training loss became nan"})
    assert type(error) is NonFiniteLossError and str(error) == "The training loss became nan"
    error = _rebuilt({"type": "builtins.ValueError", "message": "Lower --bs"})
    assert type(error) is ValueError and str(error) == "Lower --bs"


def test_other_errors_are_named_in_the_message_and_no_other_module_is_imported():
    import sys

    error = _rebuilt({"type": "torch.OutOfMemoryError", "message": "CUDA out of memory"})
    assert type(error) is StageFailedError and str(error) == "torch.OutOfMemoryError: CUDA out of memory"
    error = _rebuilt({"type": "antigravity.Fly", "message": "up"})  # a module the stage's output names is not run
    assert type(error) is StageFailedError and "antigravity" not in sys.modules


def test_a_user_error_whose_constructor_takes_more_comes_back_as_itself():
    from lib.common.errors import UserError
    from lib.train.weights import WeightsUnavailableError

    message = "Pretrained weights are not available: offline. Download it, or --no-pretrained."
    error = _rebuilt({"type": "lib.train.weights.WeightsUnavailableError", "message": message})

    assert type(error) is WeightsUnavailableError and isinstance(error, UserError) and str(error) == message
