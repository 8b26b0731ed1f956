"""guestd"""
