"""Implicit fusion (FuseChat-3.0, arXiv 2503.04222; WRPO, arXiv 2412.03187): sources contribute
responses, not token distributions, so no token alignment is needed.

One module per stage, in pipeline order: ``sample`` (every source answers every prompt several
times), ``score`` (a reward model and/or verifiers, see ``verifiers``), ``prefer`` (the SFT set
and preference pairs in TRL's conversational format), ``dpo`` (the WRPO loss on TRL's
DPOTrainer; it imports trl, so nothing else imports it).
"""
