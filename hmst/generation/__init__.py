from hmst.generation.generate import (  # noqa: F401
    decode_one_token,
    generate,
    generate_stream,
    prefill,
)
from hmst.generation.sampling import SamplingParams, sample_next  # noqa: F401
