"""guestd/replacement"""
