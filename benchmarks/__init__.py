"""Speed and memory benchmarks, beside the results they write (`make bench`; BENCHMARKS.md):

round_speed       one round of local training: vmapped (whole cohort or chunked) vs a loop
text_round_speed  the same for a Llama-family decoder, against transformers + peft
memory            the round's planned memory by clients per chunk
profile_round     where a round's time goes
workloads         the models, client updates and random blocks they time
timing            interleaved timing, paired ratios, FLOPs and planned memory
torch_baselines, peft_baselines   the optional PyTorch rows
gpu.sh            every step above on a lent accelerator, within its time
"""
