"""correctnet: robustness of neural networks on analog in-memory computing (RRAM) hardware."""
__version__ = "0.1.0"

from .analog import (AnalogLayer, DigitalWeightsWarning, analog_layers, analogize,  # noqa: E402
                     calibrate_input_ranges, chip, chips, digitize, noise_aware, nominal, program_chip, program_chips, set_noise_aware, set_nominal,
                     set_variation, register_layer_kind, nominal_weight, nominal_reads)
from .reads import AnalogReadWarning, ReadReport, check_reads  # noqa: E402
from .calibration import (evaluate_calibrated, load_calibrated_chip, save_calibrated_chip)  # noqa: E402
from .checkpoint import CheckpointError, load_checkpoint, normalize, save_checkpoint  # noqa: E402
from .errors import ConfigError, CorrectNetError, DataFormatError, DataNotFoundError  # noqa: E402
from .evaluate import MCResult, accuracy, clean_accuracy, evaluate_checkpoint, monte_carlo, chip_copy  # noqa: E402
from .lipschitz import LipschitzRegularizer, error_profile, lipschitz_constants  # noqa: E402
from .models import build_model  # noqa: E402
from .seeding import Stream, chip_seed  # noqa: E402
from .registry import make_variation  # noqa: E402
from .variation import Gaussian, LogNormal, VariationModel  # noqa: E402

__all__ = [
    "register_layer_kind", "AnalogReadWarning", "ReadReport", "check_reads", "nominal_weight", "nominal_reads", "AnalogLayer", "DigitalWeightsWarning", "analog_layers", "analogize", "calibrate_input_ranges", "chip", "chips", "program_chips",
    "evaluate_calibrated", "load_calibrated_chip", "save_calibrated_chip", "normalize", "digitize", "noise_aware", "nominal", "program_chip",
    "set_noise_aware", "set_nominal", "set_variation", "CheckpointError", "load_checkpoint", "save_checkpoint",
    "evaluate_checkpoint", "LipschitzRegularizer", "error_profile", "lipschitz_constants", "ConfigError",
    "CorrectNetError", "DataFormatError", "DataNotFoundError", "MCResult", "accuracy", "clean_accuracy",
    "monte_carlo", "chip_copy", "build_model", "Stream", "chip_seed", "Gaussian", "LogNormal", "VariationModel",
    "make_variation",
]
