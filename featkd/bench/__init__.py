"""Benchmarks that print numbers and write them as JSON: `featkd bench SUITE`.

overhead    distillation step time and memory against a plain student step + a teacher forward
scaling     time and memory of the relational losses as the batch grows
cache       epoch times with and without the teacher output cache
rkd-angle   the RKD angle loss in its direct and Gram-matrix forms
"""
