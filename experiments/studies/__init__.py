"""Studies: runs and evaluations that answer one question each.

tune                 fair tuning: each method's grid on a validation split, then the test runs
label_prior          what each client's majority label scores (the label skew's prior)
shift_severity       finished runs evaluated under test-time feature shift, by severity
global_from_clients  a global model built from the clients' personalized ones
"""
