"""Vocabulary for the support-ticket generator: label sets, products, urgency cues and surface templates.

Held-out convention (see ``holdout`` in generate_tickets.py): in every *surface* pool below (greetings, openers,
closers, sign-offs, subject lines, context details, distractor frames, chat/terse wrappers) the items at index
i % 4 == 3 are reserved for validation/test; in the urgency cue pools and scenario phrasings (ticket_scenarios.py)
the items at i % 5 == 4 are.  The label *cue vocabulary* (product names/aliases, urgency marker words, category
keywords) is shared by all splits: every marker used by a held-out cue also occurs in a training cue (checked).
All text is plain ASCII.
"""

INSTRUCTION = ("Triage the ticket. Reply with only JSON: category (billing, technical, account, shipping, returns, "
               "feature_request), product (nimbus_router, aurora_camera, pulse_watch, vault_backup, echo_speaker, "
               "orbit_app), urgency (low, medium, high, critical), summary.")

CATEGORIES = ["billing", "technical", "account", "shipping", "returns", "feature_request"]
URGENCIES = ["low", "medium", "high", "critical"]
PHYSICAL_ONLY = {"shipping", "returns"}          # categories that need a physical product

# id -> display name (used in summaries), kind, surface forms (any of them identifies the product), plan, parts
PRODUCTS = {
    "nimbus_router": dict(name="Nimbus R2 router", kind="physical",
                          forms=["Nimbus R2", "Nimbus R2 router", "NR-200", "Nimbus router"],
                          plan="Nimbus Shield plan", parts=["power adapter", "ethernet cable"]),
    "aurora_camera": dict(name="Aurora Cam 4K", kind="physical",
                          forms=["Aurora Cam 4K", "Aurora camera", "AC-4K", "Aurora Cam"],
                          plan="Aurora cloud recording plan", parts=["wall mount", "power cable"]),
    "pulse_watch": dict(name="Pulse Watch", kind="physical",
                        forms=["Pulse Watch", "Pulse Watch S", "PW-3", "Pulse smartwatch"],
                        plan="Pulse Premium plan", parts=["charging cable", "spare strap"]),
    "vault_backup": dict(name="Vault Backup service", kind="digital",
                         forms=["Vault Backup", "Vault cloud backup", "Vault Pro", "Vault backup service"],
                         plan="Vault 2TB plan", parts=[]),
    "echo_speaker": dict(name="Echo One speaker", kind="physical",
                         forms=["Echo One", "Echo One speaker", "ES-1", "Echo speaker"],
                         plan="Echo Music Plus plan", parts=["power cable", "remote control"]),
    "orbit_app": dict(name="Orbit Planner app", kind="digital",
                      forms=["Orbit app", "Orbit Planner", "Orbit Planner app", "Orbit mobile app"],
                      plan="Orbit Premium plan", parts=[]),
}

# Urgency marker words: every cue contains a marker of its own level and none of another level; no other template
# text may contain any marker (checked by lint()).  This is the rule a careful reader applies.
MARKERS = {
    "critical": [r"(?<!not )\burgent\b", r"\boutage\b", r"business is (?:completely )?down", r"security breach",
                 r"safety risk", r"all (?:of )?our (?:users|staff|customers)"],
    "high": [r"\btoday\b", r"\btonight\b", r"\basap\b", r"\bblocking\b", r"\bblocked\b", r"can't work",
             r"cannot work", r"\bdeadline\b"],
    "medium": [r"this week", r"\bannoying\b", r"\bfrustrating\b", r"\bnuisance\b", r"next few days"],
    "low": [r"no rush", r"\bwhenever\b", r"just curious", r"not urgent", r"no hurry", r"low priority",
            r"just an idea", r"in your own time"],
}

# (cue text, categories it may be used with or None for all non-feature categories, physical products only)
_NF = ("billing", "technical", "account", "shipping", "returns")
_NR = ("billing", "technical", "account", "shipping")          # generic "business down" cues: not returns
CUES = {
    "critical": [
        ("URGENT: this is an outage affecting all our users.", ("technical", "account"), False),
        ("This is URGENT - our whole business is down because of it.", _NR, False),
        ("Our business is down until this is fixed, please treat it as critical.", _NR, False),
        ("I believe this is a security breach, please handle it as URGENT.", ("account",), False),
        ("URGENT!! All our staff are affected and the business is down.", ("technical", "account", "billing"), False),
        ("It is a full outage for all our users and we are losing money by the minute.", ("technical",), False),
        ("Someone may have full access to our data - this is a security breach.", ("account",), False),
        ("This is a safety risk: the unit got very hot and I smelled burning plastic.",
         ("technical", "returns"), True),
        ("Please treat this as a safety risk, it sparked when I plugged it in.", ("technical", "returns"), True),
        ("URGENT - we need these units for our shop and the business is down without them.", ("shipping",), True),
        ("URGENT: because of this payment problem our service was suspended and the business is down.",
         ("billing",), False),
        ("This is URGENT: the shop relies on these devices and our business is down until they arrive.",
         ("shipping",), True),
        ("URGENT, all our customers are affected right now.", ("technical", "billing"), False),
        ("Consider it a safety risk - the battery is swollen and the case is cracking.", ("technical", "returns"),
         True),
        ("URGENT - our whole team is locked out and the business is down.", ("account",), False),
    ],
    "high": [
        ("I need this sorted today please.", _NF, False),
        ("This is blocking me and I can't work until it is fixed.", ("technical", "account"), False),
        ("Please help asap, I have a deadline today.", _NF, False),
        ("It is blocking my work, please fix it today.", ("technical", "account", "billing"), False),
        ("I have a client presentation today and this is blocking me.", ("technical", "account", "billing"), False),
        ("Can someone look at this asap? I cannot work like this.", ("technical", "account"), False),
        ("Need a fix today - this is blocking everything I do.", ("technical", "account"), False),
        ("I'm blocked until this is resolved and my deadline is tonight.", _NF, False),
        ("The payment deadline is today, so please fix this asap.", ("billing",), False),
        ("I need it for a trip tomorrow morning, so please help today.", ("shipping", "returns"), True),
        ("The return window closes today, so I need this handled asap.", ("returns",), True),
        ("It's a birthday present for tonight, please help asap.", ("shipping",), True),
        ("Please reply asap, I have to settle this today.", _NF, False),
        ("I cannot work without access, please help today.", ("account",), False),
        ("Please treat this as a priority and sort it out today.", _NF, False),
    ],
    "medium": [
        ("It's annoying but not the end of the world.", _NF, False),
        ("I'd like it fixed sometime this week.", ("technical", "account", "billing"), False),
        ("Not a blocker, just frustrating.", _NF, False),
        ("It's a nuisance, could you look at it in the next few days?", _NF, False),
        ("Please sort it out this week if possible.", _NF, False),
        ("It's getting pretty annoying, to be honest.", _NF, False),
        ("I can live with it for now, but I'd like it resolved this week.", _NF, False),
        ("A bit frustrating - an answer in the next few days would be great.", _NF, False),
        ("Not having this is getting annoying in daily use.", ("feature_request",), False),
        ("Working around this every day is frustrating for our team.", ("feature_request",), False),
        ("It would be nice to see it on the roadmap this week, as the workaround is a nuisance.",
         ("feature_request",), False),
        ("Honestly the lack of it is annoying, I'd like to hear back in the next few days.",
         ("feature_request",), False),
        ("It is a recurring nuisance, so a reply this week would help.", _NF, False),
        ("Doing it by hand is frustrating, please consider it this week.", ("feature_request",), False),
        ("Kind of annoying - please get back to me in the next few days.", _NF, False),
    ],
    "low": [
        ("No rush at all.", None, False),
        ("Whenever you get a chance.", None, False),
        ("Just curious, really.", _NF, False),
        ("This is not urgent.", None, False),
        ("No hurry on this one.", None, False),
        ("Low priority - answer in your own time.", None, False),
        ("Just an idea, no rush.", ("feature_request",), False),
        ("Whenever you plan the next update, no hurry.", ("feature_request",), False),
        ("Just curious whether this is expected, no rush.", _NF, False),
        ("Not urgent, reply whenever.", None, False),
        ("Low priority for me, no hurry.", None, False),
        ("Just an idea for the future, whenever you have time.", ("feature_request",), False),
        ("Take your time, this is low priority.", None, False),
        ("Reply whenever suits you.", None, False),
        ("No rush, it can wait.", None, False),
    ],
}

# Short cue variants for chat / terse messages (same marker words).
CUES_SHORT = {
    "critical": ["URGENT - outage for all our users!", "business is down, URGENT", "URGENT pls",
                 "this is a security breach!!", "URGENT, all our staff affected"],
    "high": ["need it fixed today", "blocking me, asap pls", "deadline today!!", "cannot work like this, asap",
             "pls help asap"],
    "medium": ["kinda annoying tbh", "pls fix this week", "bit of a nuisance", "frustrating...",
               "sometime this week is fine"],
    "low": ["no rush", "whenever", "no hurry", "just curious", "low priority"],
}
# Category restrictions for short cues (others may be used with any category of their level).
SHORT_CUE_CATS = {"URGENT - outage for all our users!": ("technical", "account"), "business is down, URGENT": _NR,
                  "URGENT pls": _NR, "this is a security breach!!": ("account",),
                  "URGENT, all our staff affected": ("technical", "account", "billing"),
                  "need it fixed today": ("technical", "account", "billing"),
                  "cannot work like this, asap": ("technical", "account"), "pls fix this week": _NF}

GREETINGS = ["Hello,", "Hi there,", "Dear Support Team,", "Good morning,", "Hi support,", "Hello team,",
             "Dear Sir or Madam,", "Hi,", "Good afternoon,", "Greetings,", "Hey folks,", "To whom it may concern,",
             "Dear customer care,", "Hello again,", "Hi all,", "Good evening,"]
CHAT_GREETINGS = ["hi", "hey", "hello", "hi there", "hey support", "hiya", "morning", "helo", "hey there",
                  "hi team", "ok so", "quick one:"]
OPENERS = ["I hope you are doing well.", "Thanks for reading this.", "I'll keep this short.",
           "I have been a customer for {n} years.", "I hope this is the right place to ask.",
           "First time writing to support.", "Apologies for the long message.", "Sorry to bother you again.",
           "I couldn't find an answer in the help center.", "A friend recommended your products.",
           "Writing on behalf of my family.", "I'm not very technical, so bear with me."]
STORY = ["I bought it from your online store last spring.", "I mostly use it at home.",
         "I have read through the FAQ and the community forum.", "My partner also had a look at it.",
         "I have been meaning to write about this for a while.", "English is not my first language, sorry.",
         "I'm writing from my work email.", "We are a small office of {n} people.",
         "It was recommended to me by a colleague.", "I have owned several of your products over the years.",
         "The rest of my setup is pretty standard.", "I tried the chat bot first but it could not help."]
CLOSERS = ["Can you help?", "Please advise.", "What are my options?", "Could someone look into this?",
           "Let me know what you need from me.", "Thanks in advance for your help.", "Any help appreciated.",
           "Please get back to me.", "Looking forward to your reply.", "What should I do next?",
           "I'd appreciate a quick reply.", "Hope you can sort this out.", "Tell me if you need more details.",
           "Please let me know.", "Thanks for looking into it.", "Can you check on your side?"]
CHAT_CLOSERS = ["thx", "pls help", "ty", "thanks!", "any ideas?", "cheers", "help?", "pls advise",
                "thanks in advance", "let me know"]
SIGNOFFS = ["Thanks,", "Best regards,", "Kind regards,", "Cheers,", "Regards,", "Many thanks,", "Thank you,",
            "Best,", "Warm regards,", "Sincerely,", "All the best,", "Thanks again,"]
FIRST = ["Maria", "James", "Aisha", "Tom", "Priya", "Lukas", "Chen", "Sofia", "Omar", "Emma", "Diego", "Hannah",
         "Kenji", "Fatima", "Noah", "Olga", "Peter", "Grace", "Ravi", "Ines", "Marco", "Julia", "Sam", "Leila"]
LAST = ["Novak", "Smith", "Okafor", "Berg", "Garcia", "Kowalski", "Tanaka", "Dubois", "Patel", "Rossi",
        "Nguyen", "Schmidt", "Costa", "Murphy", "Haddad", "Larsen"]
COMPANIES = ["Brightline Dental", "Kestrel Logistics", "Hollow Oak Cafe", "Mosaic Studio", "Northgate Realty",
             "Pinecrest Clinic", "Blue Harbor Books", "Tidewater Design", "Redfern Accounting", "Copperleaf Bakery"]
SIG_EXTRAS = ["Customer ID: {cid}", "{company}", "Sent from my phone", "Tel: +1 555 0{n3}", "Order ref: {order}",
              "Office manager, {company}", "{email}", "Customer number {cid}"]
CITIES = ["Leeds", "Austin", "Lyon", "Porto", "Denver", "Gdansk", "Malmo", "Cork", "Utrecht", "Tampa"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
COLORS = ["black", "white", "silver", "blue", "green", "rose gold"]

# Second product mentioned in a clearly non-issue context ({Q} = the other product).
DISTRACTORS = ["My {Q} works fine, by the way.", "I also have the {Q} and it has been great.",
               "Just to be clear, my {Q} is fine.", "This is not about my {Q}, that one works perfectly.",
               "Side note: I love the {Q}, no complaints there.",
               "I have no issues with the {Q} I bought at the same time.", "The {Q} is working as expected.",
               "(My {Q} has never given me any trouble.)", "Everything is fine with my {Q}.",
               "For context, I also use the {Q} and it is fine.", "My {Q} is great, this is about something else.",
               "Nothing wrong with the {Q}, just so you know."]
# A past issue that was already resolved ({X} = a different category's topic).
PAST_ISSUES = ["Back in {month} you sorted out a {X} problem for me, thanks again for that.",
               "I had a {X} issue last year that your team resolved quickly.",
               "(My earlier ticket about a {X} problem is closed and resolved, this is something new.)",
               "You fixed a {X} question for me a while ago, so I hope you can help again.",
               "A previous {X} issue was handled well, so thanks for that.",
               "Last time I contacted you it was about a {X} problem, which is solved now.",
               "My old {X} ticket was resolved, this one is different.",
               "The {X} problem I reported in {month} is fixed, thank you."]
PAST_TOPICS = {"billing": "billing", "technical": "connection", "account": "login", "shipping": "delivery",
               "returns": "return", "feature_request": "setup"}

SUBJECTS = {
    "billing": ["Billing question", "Problem with a payment", "Question about my bill", "Charge on my card",
                "Invoice query", "Payment issue"],
    "technical": ["Device problem", "Something is not working", "Technical issue", "Fault report",
                  "Problem with my device", "Bug report"],
    "account": ["Account access", "Login problem", "Account question", "Account settings",
                "Help with my account", "Sign-in issue"],
    "shipping": ["Where is my order?", "Delivery question", "Order status", "Shipping issue",
                 "Parcel problem", "Delivery query"],
    "returns": ["Return request", "Question about a return", "Returns", "Refund for my return",
                "Return query", "Sending an item back"],
    "feature_request": ["Feature suggestion", "Idea for the product", "Product feedback", "Suggestion",
                        "Feature idea", "Wishlist item"],
}

# Category-specific context sentences (optional detail after the issue).
DETAILS = {
    "billing": ["My customer ID is {cid}.", "The charge is from {date}.", "I pay with a card ending in {last4}.",
                "I have attached a screenshot of the bank statement.", "The receipt number is {order}.",
                "I checked my statement twice.", "My payment details have not changed.",
                "The billing email is {email}."],
    "technical": ["I already tried restarting it and a factory reset.", "I'm on version {ver}.",
                  "Reinstalling did not help.", "It worked fine until {month}.",
                  "I tried a different network too.", "I have not changed any settings.",
                  "The support article did not help.", "It happens several times a day."],
    "account": ["The account email is {email}.", "I can confirm my identity if needed.",
                "My username is {user}.", "I have checked my spam folder.", "I've had the account since {month}.",
                "I only have the one email address.", "I can send a copy of my ID.",
                "I tried both the website and the phone."],
    "shipping": ["The order number is {order}.", "It was supposed to go to {city}.", "I ordered it on {date}.",
                 "I chose standard delivery at checkout.", "The courier has not contacted me.",
                 "My neighbours have not seen anything either.", "I have the confirmation email.",
                 "I live in {city}."],
    "returns": ["The order number is {order}.", "The item is in its original box.", "I bought it on {date}.",
                "I still have the receipt.", "All the accessories are included.",
                "I paid by card, so the money should go back there.", "It was a gift from my sister.",
                "The return reference is {order}."],
    "feature_request": ["I use it every day and love it otherwise.", "Other products already do this.",
                        "Our whole family would use it.", "I'm happy to test a beta.",
                        "Several friends asked me about the same thing.", "It would save me a lot of time.",
                        "I searched the forum and others want it too.", "Thanks for a great product."],
}
