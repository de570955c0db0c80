"""Implicit fusion (FuseChat-3.0, arXiv 2503.04222; WRPO, arXiv 2412.03187): sources contribute
responses, not token distributions, so no token alignment is needed.

One module per stage, in pipeline order: ``sample`` (every source answers every prompt several
times), ``score`` (a reward model and/or verifiers, see ``verifiers``), ``prefer`` (the SFT set
and preference pairs in TRL's conversational format), ``sft`` and ``dpo`` (TRL's trainers; the
preference losses are declared in ``preference_losses``, their own trainers in
``preference_trainers``), ``rate``, and ``recipe`` running them all.
"""
