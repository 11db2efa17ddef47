# Copyright 2021 DeepMind Technologies Limited
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     https://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# Vendored for perceiver_np's tests (tests/test_record_jax.py) from
# https://github.com/google-deepmind/deepmind-research, perceiver/io_processors.py,
# commit f5de0ede8430809180254ee957abf36ed62579ef. See README.md and LICENSE in this directory.
# Modifications (every one):
#   - this comment;
#   - only what perceiver.py uses is kept, unchanged: ModalitySizeT and restructure
#     (MultimodalDecoder calls it). Removed: reverse_space_to_depth,
#     space_to_depth, extract_patches, patches_for_flow, Conv2DDownsample,
#     Conv2DUpsample, Conv3DUpsample, ImagePreprocessor, ImagePostprocessor,
#     OneHotPreprocessor, AudioPreprocessor, AudioPostprocessor,
#     IdentityPostprocessor, MultimodalPreprocessor, MultimodalPostprocessor,
#     ClassificationPostprocessor, ProjectionPostprocessor, EmbeddingDecoder,
#     PreprocessorOutputT, PreprocessorT and PostprocessorT;
#   - the imports are the ones the kept code needs (typing.Mapping, jax.numpy).

"""IO pre- and post-processors for Perceiver."""

from typing import Mapping

import jax.numpy as jnp


ModalitySizeT = Mapping[str, int]


def restructure(modality_sizes: ModalitySizeT,
                inputs: jnp.ndarray) -> Mapping[str, jnp.ndarray]:
  """Partitions a [B, N, C] tensor into tensors for each modality.

  Args:
    modality_sizes: dict specifying the size of the modality
    inputs: input tensor
  Returns:
    dict mapping name of modality to its associated tensor.
  """
  outputs = {}
  index = 0
  # Apply a predictable ordering to the modalities
  for modality in sorted(modality_sizes.keys()):
    size = modality_sizes[modality]
    inp = inputs[:, index:index + size]
    index += size
    outputs[modality] = inp
  return outputs
