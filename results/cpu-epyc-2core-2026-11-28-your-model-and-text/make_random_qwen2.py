import sys, shutil, torch, transformers
from pathlib import Path
from llmopt.data import load_split
from llmopt.tokenizer import train_tokenizer, save_tokenizer
out = Path("/tmp/myqwen"); shutil.rmtree(out, ignore_errors=True); out.mkdir()
tok = train_tokenizer([load_split("validation")[0][:200_000]], vocab_size=512)
save_tokenizer(tok, out)
cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
    bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
torch.manual_seed(0)
m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
m.save_pretrained(out)
print(sorted(p.name for p in out.iterdir()))
