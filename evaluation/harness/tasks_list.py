"""Names and one-line descriptions of the shipped lm-eval tasks (evaluation/harness/tasks/*.yaml), for `--help`
without importing lm-eval."""
SHIPPED = {
    "tickets_triage": "generate_until: the triage JSON; exact_match, json_valid, acc_<field> (endpoint or folder)",
    "tickets_category_mc": "multiple_choice: category among 6 (loglikelihood: acc, acc_norm; folder only)",
    "tickets_urgency_mc": "multiple_choice: urgency among 4 (loglikelihood: acc, acc_norm; folder only)",
}
