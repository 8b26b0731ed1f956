"""guestd/workload"""
