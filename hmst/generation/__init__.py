from hmst.generation.fast_forward import (  # noqa: F401
    fast_logits,
    prepare_for_inference,
    reference_logits,
)
from hmst.generation.generate import (  # noqa: F401
    decode_one_token,
    generate,
    generate_stream,
    prefill,
)
from hmst.generation.quantize import quantize_int8  # noqa: F401
from hmst.generation.sampling import SamplingParams, sample_next  # noqa: F401
