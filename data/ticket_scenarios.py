"""Issue scenarios for the support-ticket generator.

Each scenario: (id, category, products it applies to, allowed urgencies or None for all, summary template,
phrasings).  Products: "any", "physical", "digital" or a tuple of product ids.  Phrasings use {P} for the product
mention (exactly once) and slots filled by generate_tickets.slots(); the summary uses {name} (display name).
Phrasings at index i % 5 == 4 are held out of the training split.  No text here may contain an urgency marker.
"""

HIGHER = ("medium", "high", "critical")
NOT_CRIT = ("low", "medium", "high")       # returns are critical only for a faulty (safety) unit

SCENARIOS = [
    # ------------------------------------------------------------------ billing
    ("double_charge", "billing", "any", None, "Customer was charged twice for the {month} {name} payment.", [
        "I was charged twice for my {P} in {month}, two identical payments of {amount} on my card.",
        "My card shows the {P} payment of {amount} two times for {month}.",
        "There is a double charge for the {P} on my statement - {amount} went out twice in {month}.",
        "You billed me two times for the same {P} payment ({amount}, {month}).",
        "Looks like the {month} payment for my {P} was taken twice from my card."]),
    ("charged_after_cancel", "billing", "any", None, "Customer was still billed for the {plan} after cancelling.", [
        "I cancelled the {plan} for my {P} in {month} but you still charged me {amount}.",
        "Even though I ended the subscription on my {P}, a new payment of {amount} was taken.",
        "Why am I still paying for the {P} subscription? I cancelled the {plan} last month.",
        "The {plan} on my {P} was cancelled weeks ago, yet my card was billed {amount} again.",
        "Got billed {amount} for the {P} after I had already cancelled the {plan}."]),
    ("wrong_amount", "billing", "any", None, "Customer was billed {amount} instead of {amount2} for the {name}.", [
        "The price on your site for the {P} was {amount2} but I was charged {amount}.",
        "My {P} invoice says {amount}, but the price I signed up for is {amount2}.",
        "I was billed {amount} for the {P} - that's more than the {amount2} I agreed to.",
        "Charged {amount} for my {P} instead of {amount2}, please correct the amount.",
        "Why did the {P} charge go up to {amount}? It has always been {amount2}."]),
    ("invoice_fix", "billing", "any", None, "Customer needs a corrected invoice with company details for the {name}.", [
        "I need an invoice for my {P} purchase with our company name and VAT number on it.",
        "The invoice for the {P} has the wrong company address, can you issue a corrected one?",
        "Could you send me a proper invoice for the {P}? The receipt I got has no tax details.",
        "Our finance team needs the {P} invoice reissued to {company}.",
        "Please correct the billing name on my {P} invoice, it should say {company}."]),
    ("card_declined", "billing", "any", None, "Customer's card is declined when paying for the {name}.", [
        "My card keeps getting declined when I try to pay for the {P}, but it works everywhere else.",
        "Payment for the {P} fails at checkout with 'card declined' although my bank says the card is fine.",
        "I can't complete the payment for my {P}, every card I try is declined.",
        "Checkout for the {P} rejects my credit card every time.",
        "Your payment page declines my card for the {P} renewal."]),
    ("promo_missing", "billing", "any", None, "Promo code {promo} was not applied to the {name} purchase.", [
        "The discount code {promo} was accepted but the {P} total did not change.",
        "I used promo code {promo} for my {P}, but I was charged the full price.",
        "Your {promo} coupon didn't apply to my {P} order, I paid {amount} instead of the discounted price.",
        "Promo {promo} said applied, yet the full {amount} was billed for the {P}.",
        "I was promised {pct}% off the {P} with code {promo}, but the discount never showed on the charge."]),
    ("unknown_charge", "billing", "any", None, "Customer does not recognise a {amount} charge for the {name}.", [
        "There's a {amount} charge from you on my card labelled {P} and I don't know what it is for.",
        "I don't recognise a {amount} payment for the {P} on my bank statement.",
        "Can you explain a charge of {amount} for the {P} dated {date}? I didn't buy anything.",
        "My statement lists '{P} {amount}' and I have no idea where it came from.",
        "Mystery charge of {amount} for the {P} on {date} - what is this?"]),
    ("change_card", "billing", "any", None, "Customer wants to change the payment card used for the {name}.", [
        "How do I change the credit card that pays for my {P}?",
        "I got a new card and need to update the payment method for the {P}.",
        "Please switch my {P} payments to my new card ending in {last4}.",
        "The card on file for my {P} expires soon, where can I replace it?",
        "I'd like to pay for the {P} with PayPal instead of my credit card."]),
    ("vat_charged", "billing", "any", None, "Customer was charged VAT on the {name} despite a valid tax ID.", [
        "You added VAT to my {P} payment even though I entered our tax ID.",
        "Our {P} receipt includes sales tax although we are tax exempt and sent the certificate.",
        "VAT was charged on the {P} order despite a valid EU VAT number.",
        "Why is there tax on my {P} bill? Our company tax ID is on file.",
        "The {P} charge of {amount} includes VAT that should not be there for a business customer."]),
    # ------------------------------------------------------------------ technical
    ("no_power", "technical", "physical", None, "Customer's {name} will not power on.", [
        "My {P} won't turn on anymore, not even after charging it overnight.",
        "The {P} is completely dead - no lights, nothing happens when I press the power button.",
        "My {P} does not power up since {date}, the status light stays off.",
        "I can't get the {P} to switch on at all.",
        "Held the button on my {P} for 30 seconds and it still will not start."]),
    ("disconnects", "technical", ("nimbus_router", "aurora_camera", "echo_speaker", "pulse_watch"), None,
     "Customer's {name} keeps losing its connection.", [
        "My {P} keeps dropping the Wi-Fi connection every few minutes.",
        "The {P} disconnects constantly and I have to reconnect it by hand.",
        "The connection on my {P} drops several times an hour.",
        "My {P} goes offline again and again, then comes back after a while.",
        "Every evening the {P} loses its connection and shows as offline."]),
    ("update_failed", "technical", "any", None, "A software update failed on the customer's {name} with error {code}.", [
        "The latest update for my {P} failed halfway and now it shows error {code}.",
        "Installing the new update on the {P} stops at {pct}% with error {code}.",
        "After the update my {P} shows error {code} and won't work properly.",
        "The update keeps failing on my {P}: error {code} every time.",
        "My {P} froze during the software update and displays {code}."]),
    ("crashes", "technical", "digital", None, "The {name} crashes when the customer opens it.", [
        "The {P} crashes every time I open it.",
        "My {P} closes by itself a few seconds after launching.",
        "Since version {ver} the {P} crashes on startup.",
        "The {P} freezes and then shuts down each time I open the settings screen.",
        "Every time I launch the {P} it goes to a blank screen and quits."]),
    ("sync_broken", "technical", ("vault_backup", "orbit_app", "pulse_watch"), None,
     "The customer's {name} has stopped syncing data.", [
        "My {P} stopped syncing on {date}, nothing new shows up.",
        "Data from my {P} isn't syncing to my other devices anymore.",
        "The {P} sync hangs at {pct}% and never finishes.",
        "Syncing on the {P} fails with error {code}.",
        "My {P} no longer syncs, the last successful sync was on {date}."]),
    ("battery_drain", "technical", ("pulse_watch", "aurora_camera", "echo_speaker"), None,
     "The customer's {name} battery drains much faster than expected.", [
        "The battery on my {P} drains in a few hours now.",
        "My {P} used to last two days on a charge, now it is empty by lunch.",
        "Battery life on the {P} has dropped to almost nothing since {month}.",
        "The {P} loses about {pct}% battery an hour even when idle.",
        "My {P} needs charging all the time, the battery runs down really fast."]),
    ("error_code", "technical", "any", None, "The customer's {name} keeps showing error {code}.", [
        "I keep getting error code {code} on my {P}.",
        "My {P} throws error {code} and stops working.",
        "What does error {code} mean on the {P}? It keeps popping up and nothing works.",
        "Error {code} appears on my {P} several times a day.",
        "The {P} shows {code} on the screen and refuses to do anything."]),
    ("slow", "technical", "any", None, "The customer's {name} has become very slow.", [
        "My {P} has become extremely slow since {month}.",
        "Everything on the {P} takes ages now, it used to be fast.",
        "The {P} is really sluggish, every action takes a long time.",
        "Performance of my {P} dropped massively after {month}.",
        "My {P} lags badly and takes forever to respond."]),
    ("setup_fails", "technical", "physical", None, "Customer cannot complete the setup of a new {name}.", [
        "I can't get my new {P} set up, the setup hangs at the pairing step.",
        "Setup of the {P} fails every time at the last step.",
        "My {P} is brand new and I can't pair it with my phone.",
        "The {P} won't finish setup, the wheel just keeps spinning.",
        "Trying to set up the {P} for the first time but it never connects."]),
    ("restore_fails", "technical", ("vault_backup",), None, "Customer cannot restore files from the {name}.", [
        "Restoring files from {P} fails with a timeout.",
        "I can't restore my backup from {P}, it stops at {pct}%.",
        "{P} won't let me download my backed up files, error {code}.",
        "File restore from my {P} keeps failing.",
        "Getting my files back out of {P} fails every time I try."]),
    ("audio_crackle", "technical", ("echo_speaker",), None, "The customer's {name} produces crackling audio.", [
        "My {P} makes a crackling noise at any volume.",
        "Sound from the {P} keeps crackling and cutting out.",
        "The {P} distorts badly, even at low volume.",
        "There is a buzzing and crackling sound from my {P} when music plays.",
        "Audio on my {P} pops and crackles since {month}."]),
    ("video_blurry", "technical", ("aurora_camera",), None, "The customer's {name} records blurry or black video.", [
        "The video from my {P} is blurry, even in daylight.",
        "My {P} records only a black image at night.",
        "Night vision on the {P} stopped working, the footage is just dark.",
        "Recordings from the {P} are out of focus and grainy.",
        "The live view on my {P} is a blurry mess."]),
    # ------------------------------------------------------------------ account
    ("reset_email", "account", "any", None, "Customer is not receiving the password reset email for the {name}.", [
        "I'm not getting the password reset email for my {P} account.",
        "Requested a password reset for the {P} three times, no email arrived and spam is empty.",
        "The reset link for my {P} password never shows up in my inbox.",
        "Forgot my {P} password and the reset email does not come through.",
        "Password reset on the {P} account is broken, no email at all."]),
    ("locked_out", "account", "any", None, "Customer's {name} account is locked after failed login attempts.", [
        "My {P} account got locked after too many login attempts.",
        "I'm locked out of my {P} account, it says too many failed sign-ins.",
        "After a few wrong passwords my {P} account was locked and I can't get back in.",
        "Can't sign in to my {P} account, it says the account is locked.",
        "The {P} login says my account is temporarily locked, and it has said that since {date}."]),
    ("lost_2fa", "account", "any", None, "Customer lost their two-factor device and cannot log in to the {name}.", [
        "I lost my phone with the 2FA codes and can't log in to my {P} account.",
        "My authenticator app was wiped, so I can't get the two-factor code for the {P}.",
        "Got a new phone and now the {P} login asks for a 2FA code I don't have.",
        "Two-factor authentication on my {P} account is tied to my old phone number.",
        "I can't pass the two-step verification on my {P} account anymore."]),
    ("change_email", "account", "any", None, "Customer wants to change the email address on their {name} account.", [
        "How do I change the email address on my {P} account?",
        "Please update the login email for my {P} account to {email}.",
        "I no longer use my old email, can you move my {P} account to {email}?",
        "Need to switch the email on my {P} account, the settings page won't let me.",
        "Change the account email for the {P} from my work address to {email}, please."]),
    ("delete_account", "account", "any", None, "Customer asks to delete their {name} account and personal data.", [
        "Please delete my {P} account and all the data you have on me.",
        "I want to close my {P} account permanently.",
        "How can I remove my {P} account? I don't use it anymore.",
        "Under GDPR I request erasure of my {P} account and personal data.",
        "Close my {P} account please, and confirm when my data is gone."]),
    ("suspicious_login", "account", "any", HIGHER, "Customer reports a suspicious login to their {name} account.", [
        "I got an alert about a login to my {P} account from {city}, and it wasn't me.",
        "Someone changed the password on my {P} account without my permission.",
        "There's a device I don't recognise signed in to my {P} account.",
        "My {P} account shows logins from a country I have never been to.",
        "I think someone else is using my {P} account."]),
    ("transfer_owner", "account", "physical", None, "Customer wants the {name} moved to a new owner's account.", [
        "I sold my {P} and need to remove it from my account so the buyer can register it.",
        "How do I move the {P} registration to my partner's account?",
        "The {P} I bought second-hand is still linked to the previous owner's account.",
        "Please unlink my {P} from my account, I gave it to my brother.",
        "I want to hand over my {P} to a colleague, how do we move it between accounts?"]),
    ("merge_accounts", "account", "any", None, "Customer wants to merge two {name} accounts into one.", [
        "I accidentally created two {P} accounts, can you merge them?",
        "I have two accounts for the {P}, one with Google sign-in and one with email, please combine them.",
        "My {P} data is split across two accounts, how do I merge them into one?",
        "Can you merge my old {P} account into my new one?",
        "Two separate {P} accounts exist under my name, I only want one."]),
    # ------------------------------------------------------------------ shipping (physical products only)
    ("late_delivery", "shipping", "physical", None, "Customer's {name} order {order} has not arrived yet.", [
        "My {P} order {order} still hasn't arrived, it was due on {date}.",
        "Where is my {P}? Order {order} should have been delivered by {date}.",
        "I ordered the {P} on {date} and it is still not here.",
        "The delivery of my {P} (order {order}) is late.",
        "The {P} order {order} is overdue, the estimated delivery date has passed."]),
    ("tracking_stale", "shipping", "physical", None, "Tracking for the customer's {name} order has not updated.", [
        "The tracking for my {P} order hasn't updated since {date}.",
        "The tracking number for {P} order {order} shows 'label created' and nothing else.",
        "My {P} shipment has been sitting at the same depot for {days} days according to tracking.",
        "The courier tracking page for my {P} says the number is not found.",
        "No tracking updates for the {P} I ordered, order {order}."]),
    ("delivered_missing", "shipping", "physical", None, "Customer's {name} was marked delivered but never received.", [
        "Tracking says my {P} was delivered on {date}, but I never got it.",
        "The courier marked order {order} ({P}) as delivered, there's no package here.",
        "My {P} shows as delivered but it isn't at my door or with my neighbours.",
        "The package with my {P} was marked delivered, but nothing arrived.",
        "Order {order} for the {P} says delivered on {date}, I have not received it."]),
    ("change_address", "shipping", "physical", None, "Customer needs to change the delivery address for the {name}.", [
        "I entered the wrong delivery address for my {P} order {order}, can it be changed?",
        "Please ship my {P} to my office in {city} instead of my home address.",
        "Can I update the shipping address on order {order}? It's the {P}.",
        "I'm moving to {city}, please send the {P} to the new address.",
        "The {P} order has my old address on it, I need it delivered to {city}."]),
    ("missing_part", "shipping", "physical", None, "The {name} package arrived without the {part}.", [
        "My {P} arrived but the {part} was missing from the package.",
        "The box for my {P} came without the {part}.",
        "Order {order} was delivered, but the {part} for the {P} wasn't in the parcel.",
        "I received the {P}, but there was no {part} in the box.",
        "The {P} parcel was incomplete, no {part} inside."]),
    ("customs_hold", "shipping", "physical", None, "The customer's {name} delivery is held at customs.", [
        "My {P} is held at customs and the courier wants {amount} in fees.",
        "The {P} package is sitting at customs in {city}, what do I need to do?",
        "Customs is holding my {P} order {order} and asking for documents.",
        "Why is the courier asking me for import duty of {amount} before delivering the {P}?",
        "My {P} delivery has been held at customs for {days} days."]),
    ("express_slow", "shipping", "physical", None, "Customer's express-shipped {name} took longer than promised.", [
        "I paid for express shipping on my {P}, but it took {days} days to arrive.",
        "Next-day delivery was selected for the {P} and it still took {days} days.",
        "My {P} came by standard post even though I chose express delivery.",
        "The express shipping I picked for order {order} ({P}) was not honoured.",
        "I chose the fastest delivery option for my {P} and it arrived {days} days later."]),
    ("pickup_point", "shipping", "physical", None, "Customer asks to redirect the {name} delivery to a pickup point.", [
        "Can my {P} be delivered to a pickup point instead of my home?",
        "I won't be home when the {P} arrives, can the courier leave it at a parcel locker?",
        "Is it possible to collect my {P} order {order} from the depot in {city}?",
        "Please hold the {P} parcel at the local post office, I'm away.",
        "Could the courier drop my {P} at a collection point near {city}?"]),
    # ------------------------------------------------------------------ returns (physical products only)
    ("return_unopened", "returns", "physical", NOT_CRIT, "Customer wants to return an unopened {name} for a refund.", [
        "I'd like to return my {P}, it's still unopened.",
        "How do I send back an unopened {P}? I changed my mind.",
        "I want to return the {P} I bought on {date}, I never used it.",
        "Can I return my {P} for a refund? It's still sealed in the box.",
        "Please start a return for order {order}, the {P} is unopened."]),
    ("refund_pending", "returns", "physical", NOT_CRIT, "Customer has not received the refund for a returned {name}.", [
        "I returned my {P} {days} days ago and still haven't got my refund.",
        "Your warehouse received my returned {P} on {date}, but no refund yet.",
        "Where is the refund for the {P} I sent back? Return for order {order}.",
        "Still waiting on my refund for the returned {P}.",
        "The return of my {P} was confirmed but the refund of {amount} never arrived."]),
    ("exchange_colour", "returns", "physical", NOT_CRIT, "Customer wants to exchange the {name} for the {color} version.", [
        "Can I exchange my {P} for the {color} one?",
        "I got the {color2} {P} but wanted {color}, can I swap it through a return?",
        "I'd like to exchange order {order} ({P}) for the {color} version.",
        "Is it possible to exchange the {P}? I prefer the {color} colour.",
        "I want to send back my {color2} {P} and get the {color} model instead."]),
    ("label_broken", "returns", "physical", NOT_CRIT, "Customer's return label for the {name} is not working.", [
        "The return label for my {P} won't download.",
        "I never received the return label for my {P} return.",
        "The courier rejected the return label you sent for the {P}.",
        "The return label link for order {order} ({P}) says expired.",
        "I need a new return label for the {P}, the old one doesn't scan."]),
    ("warranty_return", "returns", "physical", None, "Customer wants to return a faulty {name} under warranty.", [
        "My {P} is faulty and still under warranty, I want to send it back for a replacement.",
        "Please open an RMA for my {P}, it stopped charging and it's within warranty.",
        "How do I return a defective {P} under warranty?",
        "The {P} broke after {days} days, I'd like to return it for a replacement.",
        "I want a warranty return for my {P}, it is defective."]),
    ("restocking_fee", "returns", "physical", NOT_CRIT, "Customer disputes the restocking fee on a returned {name}.", [
        "Why was a restocking fee taken from my refund for the returned {P}?",
        "You kept {amount} as a restocking fee on my {P} return, but it was unopened.",
        "My {P} return had a restocking fee I was never told about.",
        "I returned the {P} and the refund was {amount} short because of a restocking fee.",
        "Please reverse the restocking fee on return {order} ({P})."]),
    ("return_window", "returns", "physical", NOT_CRIT, "Customer asks if the {name} can still be returned after {days} days.", [
        "I bought my {P} {days} days ago, can I still return it?",
        "Is the return window still open for my {P}? It was a gift {days} days ago.",
        "Got the {P} as a gift {days} days ago, is a return still possible?",
        "What's your return period? I'd like to send back the {P}, bought {days} days ago.",
        "Can the {P} still be returned {days} days after purchase?"]),
    ("return_not_logged", "returns", "physical", NOT_CRIT, "Customer's returned {name} has not been logged as received.", [
        "I sent my {P} back on {date} but your system still says the return wasn't received.",
        "The return for my {P} shows 'awaiting item' though the courier confirmed drop-off.",
        "You haven't logged my {P} return yet, I posted it {days} days ago.",
        "My returned {P} isn't showing as received, return reference {order}.",
        "The {P} I returned on {date} still isn't marked as received."]),
]

# Feature requests: frames x product-specific features.  (verb phrase after "could", summary noun phrase)
FR_FRAMES = ["It would be great if the {P} could {feat}.", "Feature request: I'd love for the {P} to {feat}.",
             "Are there any plans for the {P} to {feat}?", "Suggestion: the {P} should be able to {feat}.",
             "Please consider updating the {P} so it can {feat}.", "I wish my {P} could {feat}.",
             "Could you add a way for the {P} to {feat}?", "Would you consider a feature so the {P} can {feat}?",
             "One thing missing from the {P}: it can't {feat}. Please add that.",
             "Have you thought about letting the {P} {feat}?"]
FR_SUMMARY = "Customer suggests adding {featn} to the {name}."
FEATURES = {
    "nimbus_router": [("turn Wi-Fi off on a schedule", "scheduled Wi-Fi downtime"),
                      ("show data usage per device", "per-device data usage"),
                      ("run a guest network with its own password", "a separate guest network"),
                      ("notify me when a new device joins", "new-device alerts"),
                      ("export the connection logs", "connection log export")],
    "aurora_camera": [("record in slow motion", "a slow-motion mode"), ("mask out privacy zones", "privacy zone masking"),
                      ("share clips straight to email", "email clip sharing"),
                      ("keep clips for 60 days", "longer clip retention"), ("detect parcels at the door", "parcel detection")],
    "pulse_watch": [("track swimming laps", "swim lap tracking"), ("show a weekly sleep report", "a weekly sleep report"),
                    ("use custom watch faces", "custom watch faces"), ("wake me with a silent vibration alarm",
                                                                       "silent vibration alarms"),
                    ("export workouts as GPX files", "GPX workout export")],
    "vault_backup": [("skip folders I choose", "folder exclusion rules"), ("back up on a custom schedule",
                                                                          "custom backup schedules"),
                     ("use a dark mode", "a dark mode"), ("keep more than 30 versions of a file", "more file versions"),
                     ("share a backed-up folder with a link", "folder link sharing")],
    "echo_speaker": [("group with other speakers for multi-room audio", "multi-room grouping"),
                     ("adjust bass and treble", "an equaliser"), ("use a sleep timer", "a sleep timer"),
                     ("play music from a USB stick", "USB playback"), ("read out my calendar", "calendar read-outs")],
    "orbit_app": [("sync with Google Calendar", "Google Calendar sync"), ("use a dark mode", "a dark mode"),
                  ("show a home screen widget", "a home screen widget"),
                  ("share task lists with my family", "shared task lists"), ("export tasks to CSV", "CSV export")],
}
