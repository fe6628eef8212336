"""Generate the bundled ``support-intents`` dataset (synthetic, deterministic).

Customer messages to an online electronics shop, each labelled with one of six intents:
billing, shipping, returns, account, technical, product (product = a pre-sale question
about a product's features, compatibility or stock).

Every intent has a list of hand-written core phrasings with slots ({laptop}, {order},
{amount}, ...) and inline alternatives ([a|b|c]). Every fourth phrasing of each intent is
held out for the test split, so the test set measures generalisation to phrasings never
seen in training. Messages are then varied in style (greetings, sign-offs, angry or
polite additions, lowercase, occasional typos) and some get a distractor sentence that
names another intent's topic without changing the intent.

Usage (from the repository root)::

    python scripts/make_support_intents.py

Only the standard library is used and the seed is fixed: running it twice writes
byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
Pools = Mapping[str, Sequence[str]]

SEED = 20240611
LABELS = ("billing", "shipping", "returns", "account", "technical", "product")
TRAIN_PER_LABEL = 120
TEST_PER_LABEL = 40
HOLDOUT_EVERY = 4  # phrasing i goes to test when i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
MIN_WORDS, MAX_WORDS = 5, 45
PROMPT_HEAD = (
    "Classify the customer message into one of: "
    "billing, shipping, returns, account, technical, product.\nMessage: "
)
PROMPT_TAIL = "\nIntent:"

# --------------------------------------------------------------------------- slot values

PRODUCTS = {
    "audio": [
        "Sony WH-1000XM5 headphones",
        "AirPods Pro",
        "Bose QuietComfort earbuds",
        "JBL Flip 6 speaker",
        "Sennheiser Momentum 4",
        "Jabra Elite 8 earbuds",
        "Beats Studio Pro",
        "Soundcore Q30 headphones",
    ],
    "wearable": [
        "Garmin Forerunner 265",
        "Apple Watch SE",
        "Fitbit Charge 6",
        "Galaxy Watch 6",
        "Amazfit GTR 4",
        "Garmin Venu 3",
    ],
    "laptop": [
        "Dell XPS 13",
        "MacBook Air M2",
        "ThinkPad X1 Carbon",
        "HP Spectre x360",
        "ASUS ZenBook 14",
        "Acer Swift 3",
        "Razer Blade 15",
    ],
    "tablet": [
        "iPad Air",
        "Galaxy Tab S9",
        "Kindle Paperwhite",
        "Lenovo Tab P11",
        "Surface Pro 9",
    ],
    "tv": [
        "Samsung 55-inch QLED TV",
        "LG C3 OLED TV",
        "Sony Bravia 65-inch TV",
        "TCL 50-inch 4K TV",
        "Hisense U8 TV",
    ],
    "camera": [
        "Canon EOS R50",
        "Sony ZV-E10",
        "GoPro Hero 12",
        "Fujifilm X-T30",
        "Nikon Z50",
    ],
    "smarthome": [
        "Ring video doorbell",
        "Philips Hue starter kit",
        "Nest thermostat",
        "Eufy security camera",
        "TP-Link Deco mesh router",
        "Echo Dot",
    ],
    "peripheral": [
        "Logitech MX Master 3S mouse",
        "Keychron K2 keyboard",
        "Razer DeathAdder mouse",
        "Logitech C920 webcam",
        "Brother laser printer",
        "Wacom drawing tablet",
    ],
    "monitor": [
        "LG 27-inch UltraGear monitor",
        "Dell 24-inch monitor",
        "Samsung Odyssey G7",
        "BenQ 32-inch 4K monitor",
    ],
    "dock": [
        "Anker USB-C dock",
        "CalDigit TS4 dock",
        "Belkin USB-C hub",
        "Dell WD19 docking station",
    ],
    "phone": ["Pixel 8", "Galaxy S24", "iPhone 15", "OnePlus 12", "Moto G Power"],
}
PRODUCTS["product"] = [p for cat in PRODUCTS.values() for p in cat]
PRODUCTS["rechargeable"] = [  # things with a battery
    p for cat in ("audio", "wearable", "laptop", "tablet", "phone") for p in PRODUCTS[cat]
]

SLOTS = {
    "os": ["Windows 11", "Windows 10", "macOS", "macOS Sonoma", "Ubuntu", "ChromeOS"],
    "mobile": ["Android phone", "iPhone", "Samsung phone", "Pixel phone", "iPad"],
    "platform": ["Android", "iOS", "Windows", "Mac", "Linux", "ChromeOS"],
    "carrier": ["UPS", "FedEx", "DHL", "USPS", "DPD", "Royal Mail"],
    "payment": ["Visa", "Mastercard", "PayPal", "Amex", "debit card", "Apple Pay", "credit card"],
    "city": [
        "Denver",
        "Leeds",
        "Austin",
        "Lyon",
        "Toronto",
        "Glasgow",
        "Portland",
        "Dublin",
        "Phoenix",
        "Manchester",
    ],
    "country": ["Canada", "Mexico", "Ireland", "Germany", "Australia", "Norway", "Japan"],
    "color": ["black", "white", "silver", "blue", "green", "rose gold"],
    "code": ["SAVE10", "WELCOME15", "SPRING20", "STUDENT10", "FLASH25", "VIP30"],
    "ago": [
        "three days ago",
        "last week",
        "two weeks ago",
        "on Monday",
        "yesterday",
        "10 days ago",
        "a month ago",
        "last Friday",
    ],
    "date": [
        "March 3",
        "the 14th",
        "May 21",
        "June 2",
        "the 9th",
        "Tuesday",
        "October 30",
        "April 18",
    ],
    "name": [
        "Tom",
        "Maria",
        "Priya",
        "Jake",
        "Chen",
        "Olga",
        "Ahmed",
        "Sam",
        "Lucy",
        "Dave",
        "Fatima",
        "Kenji",
    ],
    "lang": ["Spanish", "French", "German", "Italian"],
}
SURNAMES = ["smith", "garcia", "patel", "nguyen", "kowalski", "brown", "okafor", "rossi"]
DOMAINS = ["gmail.com", "outlook.com", "yahoo.com", "proton.me", "icloud.com"]

# --------------------------------------------------------------------------- phrasings
# A leading "!" marks a complaint: only complaints may get angry additions.

PHRASINGS = {
    "billing": [
        "!I was charged twice for order {order}. Can you refund the duplicate payment of {amount}?",
        "There's a charge of {amount} on my {payment} statement from your store that I don't recognize.",
        "!My {payment} keeps getting declined at checkout [even though there's plenty of money on it|but it works everywhere else|and I've tried {n} times now].",
        "Can I get a proper invoice with VAT for order {order}? I need it for [work|my company's expenses|my tax return].",
        "!The {product} arrived on time and works perfectly, but I was billed {amount} instead of the advertised price.",
        "Why was I charged an extra {amount} on top of the total shown at checkout?",
        "!I returned the {product} on {date} and that's all sorted, but now there's a new charge of {amount} on my card I never authorized.",
        "How do I change the card [used for|that pays] my monthly [protection plan|financing|warranty plan] payments[ on the {product}|]?",
        "!My promo code {code} was accepted but the discount never came off the [final charge|total I paid|amount on my card].",
        "What payment options do you have? Can I split the {amount} into [monthly installments|a few payments]?",
        "!You charged my card {amount} for an order I cancelled on {date}.",
        "I was charged in [euros instead of dollars|dollars instead of pounds|euros instead of pounds] and my bank added a [conversion|foreign transaction] fee[ of {amount}|]. Can you [cover|refund] that?",
        "Need a copy of the receipt for order {order}, [lost|deleted] the email.",
        "The price of the {product} dropped {n} days after I [paid for|bought] it. Do you offer a price adjustment?",
        "!Payment failed but the money was still taken from my [bank account|card]. Order {order} shows as unpaid.",
        "Is sales tax supposed to be added on top? I was charged {amount} more than I expected for order {order}.",
        "please remove the [extended warranty|protection plan|gift wrap|insurance] charge from my [bill|order {order}], i never [added|asked for] it",
        "!My gift card balance wasn't applied to order {order} and my {payment} got charged the full {amount}.",
        "I got an email saying my payment for order {order} was declined, but my bank says everything is fine. What's going on?",
        "Could you split the payment for order {order} across two cards?",
        "The invoice for order {order} has the wrong company name on it. Can you reissue it?",
        "!Still waiting on the refund for the duplicate charge from {date}. It's been {n} days.",
        "I see a pending authorization of {amount} and a second final charge for the same order. Is one of them going away?",
        "The {product} is great and delivery was fast. Only problem: my statement shows {amount}, not the {amount2} total from checkout.",
        "Do you accept {payment}? [It isn't showing as a payment option at checkout.|I can't see it at checkout.|It's not in the list of payment methods.]",
        "I'd like to pay off the rest of the financing plan on my {product} now instead of monthly.",
        "!Why is there a {amount} restocking charge on my card? I never returned anything.",
        "Our company needs to pay by bank transfer for order {order}. Can you send the payment details?",
        "I was promised a {amount} credit because my delivery was late, but it never showed up on my bill.",
        "Charged {amount} for order {order}, but the confirmation email says {amount2}. Which one is right?",
        "My student discount wasn't applied when I paid for the {product}. Can you refund the difference?",
        "!My [card|{payment}] got charged [twice|three times] when the checkout page [froze|crashed|timed out]. Please reverse the extra [payments|charges].",
        "Can you resend the invoice for {date}'s purchase to {email}? My accountant needs it.",
        "!Double charge again. Order {order}. Fix it.",
        "Is the {amount} on my statement the final amount or just a temporary hold?",
        "I paid with {payment} but order {order} has said payment pending for {n} days now.",
        "I already returned the {laptop} and got my money back, thanks. But the invoice for my other order {order} lists the wrong amount.",
        "My bank flagged your charge of {amount} as suspicious. Can you confirm it's really from you?",
        "!I got hit with a {amount} late fee on my financing plan even though I paid on time.",
        "I'm in {city} and my invoice shows the wrong tax rate. Can this be corrected?",
    ],
    "shipping": [
        "!Where is my order {order}? It was supposed to arrive {date}.",
        "!Tracking for order {order} hasn't updated in {n} days. It's just sitting at the {carrier} depot.",
        "!Tracking for order {order} says delivered[ {ago}| today|] but there is no package [at my door|with the neighbours|anywhere].",
        "Can I change the delivery address for order {order}? I just moved to {city}.",
        "Do you ship to {country}, and how long does it usually take?",
        "!My {product} is still not here after {n} days. I paid for express delivery!",
        "how much is next day delivery for the {product}",
        "The {carrier} driver left a note saying they couldn't deliver. How do I reschedule?",
        "I ordered two things in order {order} but only the {product} came. When will the rest ship?",
        "Could you have my parcel held at a {carrier} pickup point instead of delivered to my house?",
        "!Order {order} still says processing after {n} days. When will it actually ship?",
        "I need the {product} by {date} for a birthday. Will it get here in time if I order today?",
        "The tracking number you sent doesn't show anything on the {carrier} website. Is it correct?",
        "my [package|parcel|order {order}] went to my old address[ in {city}|], can you redirect it",
        "Can you send order {order} in plain packaging? It's a surprise [gift|present].",
        "My order with the {product} has been out for delivery since yesterday morning. Any update?",
        "!The {product} works great, no complaints there, but it took {n} days to arrive instead of two. Why was delivery so slow?",
        "Is there a way to combine [my two orders|orders {order} and {order2}|my last {n} orders] into one [shipment|delivery]?",
        "!Delivery attempted? I was home all day and nobody knocked. Order {order}.",
        "I don't want to return anything, I just want to know where my package is. Order {order}.",
        "Does free shipping apply to all orders over {amount}, or just to certain items?",
        "Can [the courier|{carrier}] deliver [order {order}|my order|it] on a [Saturday|Sunday|weekend]? I work [weekdays|Monday to Friday].",
        "Do you deliver to [PO boxes|a PO box|parcel lockers][ in {country}| in {city}|]?",
        "![My order|Order {order}|My {product} order] came in [two|three|four] separate boxes and only one of them has shown up.",
        "The {carrier} tracking shows my parcel being sent back to you. What happened?",
        "!I paid for order {order} on {date} and it still hasn't been dispatched.",
        "Please add delivery instructions to order {order}: leave the parcel with my neighbour at number {n}.",
        "Is international delivery to {country} tracked? I'm worried about customs delays.",
        "How long does standard delivery take to {city}?",
        "ordered the {product} {ago}, still no dispatch email",
        "Could you upgrade order {order} to express delivery? Happy to pay the difference.",
        "I logged into my account to check and order {order} now says delayed. What's the new delivery date?",
        "Customs is holding my parcel in {country}. What do I need to do to get it released?",
        "Can I [collect|pick up] [my order|order {order}|the {product}] from [a store|your {city} store] instead of having it delivered?",
        "!My {product} order has been stuck in a {carrier} warehouse in {city} for a week.",
        "Which courier do you use for deliveries to {city}?",
        "The estimated delivery is {date} but I'll be away. Can you hold off dispatching it for a few days?",
        "!Still no sign of order {order}. The tracking page is blank.",
        "Can I get a tracking number for order {order}? The confirmation email didn't include one.",
        "Your site shows the {product} in stock, which is great, but how fast can you get it to {city}?",
    ],
    "returns": [
        "I'd like to return the {product}. It's unopened and I bought it {ago}.",
        "How do I print a return label for order {order}?",
        "Can I exchange the {product} for a different colour?",
        "What's your return window for [opened electronics|an opened {product}|items bought {ago}|sale items]?",
        "!I sent the {product} back {ago} and still haven't received my refund.",
        "The {product} works fine, I just changed my mind. Can I still send it back?",
        "!You sent me the wrong item. I ordered the {laptop} but got the {laptop2}. How do I swap it?",
        "!The {product} arrived [with a cracked casing|damaged|with a dent in it]. I want a replacement, not a repair.",
        "Do I have to pay for the postage when I send the {product} back?",
        "I dropped off my return at {carrier} on {date}. Can you confirm you've received it?",
        "Is there a restocking fee if I return an opened {product}?",
        "!My return request for order {order} was rejected. Why?",
        "I only have a gift receipt. Can I return the {product} for store credit?",
        "I want to return just one item from order {order}, not the whole thing.",
        "The {monitor} is [too small for my desk|smaller than I expected]. Can I send it back and get the bigger model?",
        "Can I return the {product} in a different box? I threw away the original packaging.",
        "!the returns page keeps saying my order isn't eligible. it's only been {n} days",
        "I was charged for the {product} and I'd like to return it, since it doesn't match the description on your site.",
        "How long does it take for my refund[ for order {order}|] to come through once you [receive|get] my return[ of the {product}|]?",
        "My return label is for {carrier} but there's no {carrier} drop-off near me. Can I use a different courier?",
        "Please cancel my return for order {order}, I've decided to keep the {product}.",
        "I'd like to send back the {product}. It just isn't right for me.",
        "Started a return for order {order} {ago}. Where do I send the package?",
        "I bought the {product} as a gift and they already have one. Can I return or exchange it?",
        "!I returned [two|three] items[ from order {order}|] but I've only been refunded for one.",
        "Support told me to send the faulty {product} back for a replacement. What's my RMA number?",
        "Can I return the {product} if I bought it on sale?",
        "Your site says 30-day returns but the returns page says 14 days for my {product}. Which is it?",
        "I'd like to exchange my {phone} for the {phone2} and pay the difference.",
        "The {audio} works fine technically but the sound isn't what I expected. I'd like to return them.",
        "Do I need to include all the accessories when I return the {product}, or can I keep the case?",
        "!Got my {product} today. I ordered it in {color} and this one is {color2}. I want to swap it.",
        "I'm {n} days outside the return window. Any chance you'll still take the {product} back?",
        "Do I get a full refund or store credit if I return the {product}?",
        "what happens if i return the {product} without the receipt",
        "!The courier picked up my return on {date} but the return status hasn't changed.",
        "I want to return the {product} I received {ago}. Nothing wrong with it, I just don't need it anymore.",
        "Can I return [items|the {product}] I paid for with a gift card? Where would the refund go?",
        "I accidentally ordered the {product} twice. How do I send one of them back?",
        "My account shows my return[ for order {order}| of the {product}|] as received but the refund still says pending[ after {n} days|].",
    ],
    "account": [
        "![I forgot my password|I can't remember my password|Locked out, forgot my password] and the reset email never arrives[, even in spam|].",
        "How do I change the email address on my account to {email}?",
        "!My account got locked after [too many|{n} failed|a few wrong] login attempts[ this morning| {ago}|].",
        "[Please delete|I want you to delete|Kindly close and delete] my account [and all my personal data|and everything you store about me].",
        "I'm not getting the [two-factor|login|verification] code by text anymore. I changed my [phone number|number|mobile number][ {ago}|].",
        "!Someone logged into my account from {city}. I think I've been hacked.",
        "How do I unsubscribe from your [marketing|promotional|weekly deals] emails[ sent to {email}|]?",
        "Can I merge my two accounts[ ({email} and an old one)|]? I've [placed orders on|got order history in] both.",
        "!I can't log in to check on order {order}; it keeps saying my password is wrong.",
        "!The password reset link [says it has expired|gives an error|just loops back to the login page] [every time I click it|on both my phone and laptop].",
        "I'd like to change the name on my [profile|account], I [recently got married|got divorced|legally changed it].",
        "How do I turn [off|on] [two-step verification|2FA|the login codes] on my account?",
        "I signed up with {email} but never got the verification email.",
        "!My order history is empty even though I've bought the {product} and other things from you.",
        "cant sign in with [google|apple|facebook] anymore, it says [account not found|something went wrong]",
        "I set up my account with my work email and I'm leaving the company. How do I move it to {email}?",
        "![Your website|The app|Your site] keeps logging me out every [few minutes|time I switch pages|{n} minutes].",
        "I'd like to update the [phone number|date of birth|contact number] on my account[ to a new one|, the old one is gone|].",
        "My {product} works fine and delivery was great, I just can't log in to leave a review.",
        "I checked out as a guest for order {order}. Can it be linked to my account afterwards?",
        "!I got [an email|a text] saying my [account password|account email] was changed[ {ago}| today|], but I didn't change it!",
        "How do I [download|request] a copy of all the personal data you have on me[ under {email}|]?",
        "I'd like to stop getting [text messages|push notifications|calls] about [offers|sales|new products].",
        "!My username is suddenly taken by someone else? I've had this account [for years|since 2015|for {n} years].",
        "!The login page says my email isn't registered, but I've ordered from you {n} times.",
        "Can you reactivate my account? I closed it {ago} by mistake.",
        "Where [can I|do I] change my [communication|email|notification] preferences[ in the app|]?",
        "!My [reward points|loyalty points|saved wishlist] disappeared from my account after I [updated my email address|changed my password|logged in on a new phone].",
        "Setting up two-factor login[ on my account|] and the [authenticator app|SMS] code [is always rejected|never works].",
        "Please change the [language|display language] of my account to {lang}.",
        "My [partner|wife|husband|brother] and I share one account and want to split it into two[ separate|] accounts.",
        "!I keep getting [account suspended|account disabled] when I try to log in[ on the app|]. [What did I do?|Why?]",
        "I don't need to change anything on order {order}, I only need to reset my password.",
        "How do I close my account? I've already returned [everything I bought|the {product}|my last order].",
        "The login code goes to my old number ending in {digits}. How do I update that?",
        "Is there a way to see [the login history|which devices are signed in|recent sign-ins] [for|on] my account?",
        "!I never signed up for an account but I keep getting welcome emails. Please remove {email}.",
        "!My [profile|account page] shows someone else's [name and address|name|phone number]. Was there a mix-up with my account?",
        "My security question answers aren't accepted[ even though I'm sure they're right|, I've tried {n} times| when I try to log in].",
        "How do I change my account [password|email|phone number] from the [mobile app|app on my {mobile}]?",
    ],
    "technical": [
        "!My {rechargeable} won't turn on anymore, even after charging it overnight.",
        "!My {audio} keep disconnecting from my {mobile} every few minutes.",
        "How do I update the firmware on my {product}?",
        "!My {laptop} gets really hot and the fan is loud even when it's idle.",
        "!My {smarthome} won't connect to the wifi. I've already restarted the router.",
        "The screen on my {tablet} flickers [when the brightness is low|at night|after a few minutes].",
        "!I can't get my {audio} to pair with my {mobile}. They don't show up in the bluetooth list.",
        "The {wearable} arrived quickly and I love it, but the battery is dead after {n} hours.",
        "I don't want to send the {peripheral} back, I just need help getting it working on {os}.",
        "Which driver do I need for my {peripheral} on {os}? It isn't being recognized.",
        "!Since the latest update my {product} keeps restarting by itself.",
        "No sound coming out of the left side of my {audio}.",
        "!My {tv} has no picture but I can hear the sound[. The HDMI cable is fine|, even on a different input].",
        "My {product} is showing error code E{n}. What does that mean?",
        "How do I factory reset my {product}?",
        "the touchscreen on my {tablet} stopped responding [to taps in one corner|near the edges]",
        "!My {product} was working fine until yesterday, now it's stuck on the logo screen.",
        "The app for my {smarthome} crashes every time I open it on my {mobile}.",
        "I just set up my {smarthome}. How do I link it to Alexa?",
        "My [Logitech MX Master 3S|Razer DeathAdder|Logitech M720] mouse is lagging on {os}, the cursor jumps around.",
        "!My {laptop} won't charge with the USB-C adapter that came with it.",
        "The mic on my {audio} isn't picked up in video calls on {os}.",
        "!I paid a lot for this {product} and it keeps freezing. How do I fix it?",
        "The wifi on my {laptop} keeps dropping, it started {ago}. How can I troubleshoot it?",
        "My {camera} shows a card error [even with a brand new SD card|with every SD card I try].",
        "!My {wearable} stopped tracking my heart rate after the update.",
        "The remote for my {tv} won't pair [with the TV|anymore|after I changed the batteries].",
        "Some keys on my {laptop} don't register unless I press really hard.",
        "!My {wearable} won't sync with the app on my {mobile}.",
        "I'm trying to run two monitors from my {dock} but {os} only detects one.",
        "!My {camera} overheats and shuts off when recording [4K video|for more than ten minutes].",
        "my {rechargeable} makes a buzzing noise while charging, is that normal",
        "!My {rechargeable} says the battery is at 100% but dies the moment I unplug it.",
        "How can I move my settings from my old {wearable} to the new one?",
        "!My {smarthome} lost all its settings after a power cut.",
        "The bluetooth on my {audio} cuts out when my phone is only [two|three|a few] meters away.",
        "How do I calibrate the colours on my {monitor}[ for photo editing|]?",
        "!My {laptop} blue screens every time it wakes from sleep on {os}.",
        "Logging into your site is fine, but my {product} itself won't boot past the update screen.",
        "!I got the {rechargeable} as a replacement and the same problem is back: it won't hold a charge.",
    ],
    "product": [
        "Is the {product} compatible with {platform}?",
        "Does the {audio} have active noise cancelling?",
        "When will the {product} be back in stock?",
        "What's the difference between the {laptop} and the {laptop2}?",
        "Can the {laptop} drive two external monitors?",
        "Is the {wearable} waterproof enough to swim with?",
        "How much storage does the {tablet} [come with|have], and can it be expanded?",
        "Does the {camera} [come with|include] a lens or is it body only?",
        "Before I order: does the {rechargeable} come with a charger in the box?",
        "Will the {dock} work with my {laptop}?",
        "What's the battery life of the {rechargeable} with normal use?",
        "Is the {tv} available in a [bigger|smaller] size?",
        "I'm thinking of buying the {smarthome}. Does it need a hub or does it work on its own?",
        "Does the {product} support {platform}? I want to be sure before I pay.",
        "Which is better for running, the {audio} or the {audio2}?",
        "Is the {product} you sell the latest model or last year's version?",
        "Do you have the {product} in {color}?",
        "Can I use the {audio} with a PS5?",
        "Does the {laptop} have a backlit keyboard?",
        "Is the {monitor} any good for gaming? [What's the refresh rate?|Does it do 144Hz?]",
        "What ports does the {laptop} have? I need HDMI.",
        "Any plans to restock the {product} in {color}?",
        "Does the {wearable} work with [an Android phone|an iPhone|a Pixel] or only with its own brand?",
        "Is the {camera} [weather sealed|fine to use in the rain]?",
        "I had to return my last headphones because they didn't fit. Does the {audio} come with different ear tip sizes?",
        "How heavy is the {laptop}?",
        "Can the {smarthome} be controlled when I'm away from home?",
        "Does the {tv} support [Dolby Vision and HDR10+|HDMI 2.1|eARC]?",
        "My account has {amount} in store credit. Before I spend it, is the {product} compatible with {platform}?",
        "Will the {product} work in {country}, with the different plugs and voltage there?",
        "Is the {peripheral} wireless or does it need a cable?",
        "How many devices can the {audio} connect to at the same time?",
        "Do you sell a carrying case that fits the {product}?",
        "Is the {product} on your site refurbished or brand new?",
        "Can I get the {laptop} with 32GB of RAM?",
        "Does the {tablet} support [a stylus|a keyboard cover]?",
        "Delivery time doesn't matter to me, I just want to know if the {phone} has [a headphone jack|expandable storage|wireless charging].",
        "Is a newer version of the {product} coming out soon, or should I buy now?",
        "What's the max resolution the {dock} supports on {os}?",
        "Can the {camera} shoot [4K at 60fps|slow motion]?",
    ],
}

# --------------------------------------------------------------------------- style parts

GREETINGS = [
    "Hi.",
    "Hello!",
    "Hi there!",
    "Hey.",
    "Good morning.",
    "Good afternoon!",
    "Hello team.",
    "Dear support team.",
    "hey!",
    "Hi team.",
]
CONTEXT = [
    "Quick question.",
    "I've shopped with you for years.",
    "First time ordering from you.",
    "Hope you can help.",
    "Long-time customer here.",
    "Sorry to bother you.",
]
POLITE_END = [
    "Could you help?",
    "Thanks in advance!",
    "Any help appreciated.",
    "Please advise.",
    "Thank you for your time.",
    "Much appreciated.",
]
ANGRY_START = [
    "This is ridiculous.",
    "Seriously?",
    "I'm very frustrated.",
    "Third time writing about this!",
    "Really disappointed.",
    "Not happy at all.",
]
ANGRY_END = [
    "Sort it out!",
    "Unacceptable.",
    "I want an answer today.",
    "Very poor service.",
    "Fix this now.",
]
SIGN_OFFS = [
    "Thanks, {name}",
    "Cheers",
    "Regards, {name}",
    "- {name}",
    "Thank you!",
    "Best, {name}",
]
# Sentences naming another intent's topic while confirming the message's own intent.
DISTRACTORS = {
    "billing": [
        "The delivery itself was fine.",
        "The product itself works great.",
        "I'm not asking to return anything.",
        "I can log in fine, it's just the charge.",
    ],
    "shipping": [
        "The payment went through fine.",
        "I don't need to return anything.",
        "No problems with my account.",
        "I just want the parcel.",
    ],
    "returns": [
        "Delivery was quick, no complaint there.",
        "Payment was fine.",
        "It's not faulty, I just want to send it back.",
        "I still have the receipt.",
    ],
    "account": [
        "My orders themselves are fine.",
        "This isn't about a delivery.",
        "Nothing to do with billing, it's the login.",
        "Not a payment issue.",
    ],
    "technical": [
        "Delivery was fast, by the way.",
        "I don't want a refund, just a fix.",
        "I'd rather not return it.",
        "Billing is fine, it's the device.",
    ],
    "product": [
        "I haven't ordered yet.",
        "I'd order today if it does.",
        "Happy to pay for express delivery if so.",
        "Trying to decide before buying.",
    ],
}

SLOT_RE = re.compile(r"\{(\w+)\}")
ALT_RE = re.compile(r"\[([^\[\]]*)\]")


def money(rng: random.Random) -> str:
    cur = rng.choices(["$", "£", "€"], weights=[8, 1, 1])[0]
    whole = rng.choice([rng.randint(5, 99), rng.randint(100, 1999)])
    cents = rng.choice(["", ".99", ".00", ".49", f".{rng.randint(10, 95)}"])
    return f"{cur}{whole}{cents}"


def order_no(rng: random.Random) -> str:
    n = rng.randint(100000, 9999999)
    return rng.choice([f"#{n}", str(n), f"ORD-{n}", f"no. {n}"])


def slot_value(
    slot: str, rng: random.Random, used: dict[str, str], pools: Pools | None = None
) -> str:
    """A value for ``slot``; ``pools`` replaces some slots' value lists (support-extract
    keeps some products out of training this way)."""
    base = slot.rstrip("2")
    listed = (pools or {}).get(base) or PRODUCTS.get(base) or SLOTS.get(base)
    if slot.endswith("2") and base in used:  # a second, different value of the same slot
        if listed:
            return rng.choice([v for v in listed if v != used[base]])
        value = slot_value(base, rng, {})
        while value == used[base]:
            value = slot_value(base, rng, {})
        return value
    if listed:
        return rng.choice(listed)
    if base == "amount":
        return money(rng)
    if base == "order":
        return order_no(rng)
    if base == "n":
        return str(rng.randint(2, 14))
    if base == "digits":
        return str(rng.randint(10, 99))
    if base == "email":
        return f"{rng.choice(SLOTS['name']).lower()}.{rng.choice(SURNAMES)}@{rng.choice(DOMAINS)}"
    raise KeyError(f"unknown slot {slot!r}")


def fill_slots(
    template: str, rng: random.Random, pools: Pools | None = None
) -> tuple[str, dict[str, str]]:
    """``template`` with its alternatives chosen and slots filled, and the value of each
    slot it used (support-extract's answers are made of them)."""
    text = ALT_RE.sub(lambda m: rng.choice(m.group(1).split("|")), template)
    used: dict[str, str] = {}

    def sub(m: re.Match) -> str:
        slot = m.group(1)
        if slot not in used:  # a slot named twice keeps its value
            used[slot] = slot_value(slot, rng, used, pools)
        return used[slot]

    text = SLOT_RE.sub(sub, text)
    return re.sub(r" ([?.!,])", r"\1", re.sub(r" {2,}", " ", text)).strip(), used


def fill(template: str, rng: random.Random) -> str:
    return fill_slots(template, rng)[0]


def typo(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    idx = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 5]
    if not idx:
        return text
    i = rng.choice(idx)
    w = words[i]
    j = rng.randint(1, len(w) - 3)
    kind = rng.randrange(3)
    if kind == 0:  # swap two neighbouring letters
        w = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    elif kind == 1:  # drop a letter
        w = w[:j] + w[j + 1 :]
    else:  # double a letter
        w = w[: j + 1] + w[j] + w[j + 1 :]
    words[i] = w
    return " ".join(words)


def stylize(core: str, label: str, complaint: bool, rng: random.Random) -> str:
    parts: list[str] = []
    angry = complaint and rng.random() < 0.3
    if rng.random() < 0.3:
        parts.append(rng.choice(GREETINGS))
    if angry and rng.random() < 0.6:
        parts.append(rng.choice(ANGRY_START))
    elif not angry and rng.random() < 0.1:
        parts.append(rng.choice(CONTEXT))
    parts.append(core)
    if rng.random() < 0.25:
        parts.append(rng.choice(DISTRACTORS[label]))
    if angry and rng.random() < 0.5:
        parts.append(rng.choice(ANGRY_END))
    elif not angry and rng.random() < 0.15:
        parts.append(rng.choice(POLITE_END))
    if rng.random() < 0.2:
        signed = [s for s in SIGN_OFFS if "{name}" in s] if parts[-1] in POLITE_END else SIGN_OFFS
        parts.append(fill(rng.choice(signed), rng))
    # a part without end punctuation ("... i never added it") gets a full stop when followed
    parts = [p if i == len(parts) - 1 or p[-1] in ".!?," else p + "." for i, p in enumerate(parts)]
    text = " ".join(parts)
    if angry and text.endswith(".") and rng.random() < 0.3:
        text = text[:-1] + "!!"
    r = rng.random()
    if r < 0.15:
        text = text.lower()
    elif r < 0.22:  # terse: drop the final full stop
        text = text.rstrip(".")
    n_typos = rng.choices([0, 1, 2], weights=[82, 15, 3])[0]
    for _ in range(n_typos):
        text = typo(text, rng)
    return text


def norm_key(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def cycle(pool: list[T], count: int, rng: random.Random) -> list[T]:
    """``count`` items of ``pool`` in shuffled rounds, so each is used about equally often."""
    order: list[T] = []
    while len(order) < count:
        batch = pool[:]
        rng.shuffle(batch)
        order.extend(batch)
    return order[:count]


def split_phrasings(label: str) -> tuple[list[str], list[str]]:
    pool = PHRASINGS[label]
    train = [p for i, p in enumerate(pool) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    test = [p for i, p in enumerate(pool) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    return train, test


def generate(
    rng: random.Random, label: str, pool: list[str], count: int, seen: set[str]
) -> list[str]:
    """``count`` unique messages, using every phrasing of ``pool`` about equally often."""
    out: list[str] = []
    for template in cycle(pool, count, rng):
        for _ in range(200):
            complaint = template.startswith("!")
            core = fill(template.lstrip("!"), rng)
            msg = stylize(core, label, complaint, rng)
            key = norm_key(core)  # one message per filled core: no near-duplicates
            if MIN_WORDS <= len(msg.split()) <= MAX_WORDS and key not in seen:
                seen.add(key)
                out.append(msg)
                break
        else:
            raise RuntimeError(f"could not make a new message from {template!r}")
    return out


def record(message: str, label: str) -> dict[str, str]:
    return {"prompt": PROMPT_HEAD + message + PROMPT_TAIL, "completion": " " + label}


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    train: list[dict] = []
    test: list[dict] = []
    for label in LABELS:
        train_pool, test_pool = split_phrasings(label)
        test += [record(m, label) for m in generate(rng, label, test_pool, TEST_PER_LABEL, seen)]
        train += [record(m, label) for m in generate(rng, label, train_pool, TRAIN_PER_LABEL, seen)]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generator_main(name: str, build, seed: int, description: str) -> None:
    """The command line every bundled-data generator shares: ``--out-dir``, ``--seed``,
    and ``NAME_train.jsonl`` / ``NAME_test.jsonl`` from ``build(seed)``."""
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out-dir", type=Path, default=root / "src" / "slimtune" / "datasets")
    parser.add_argument("--seed", type=int, default=seed)
    args = parser.parse_args()
    train, test = build(args.seed)
    write_jsonl(args.out_dir / f"{name}_train.jsonl", train)
    write_jsonl(args.out_dir / f"{name}_test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test records to {args.out_dir}")


def main() -> None:
    generator_main("support_intents", build, SEED, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
